//! Test-only panics at named points, armed per dataset URL so that tests running side by side
//! do not trip each other's.

use std::sync::Mutex;

static ARMED: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());

pub fn arm(point: &'static str, url: &str) {
    ARMED.lock().unwrap().push((point, url.to_string()));
}

pub fn hit(point: &'static str, url: &str) {
    let armed = ARMED.lock().unwrap().iter().any(|(p, u)| *p == point && u == url);
    if armed {
        panic!("failpoint `{point}` hit for {url}");
    }
}
