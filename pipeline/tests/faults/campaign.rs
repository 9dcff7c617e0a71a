//! The campaign's size and seeded placement (`SAE_FAULT_KILLS`, `SAE_FAULT_SEED`), and the
//! per-scenario tally printed as its summary line.

use std::io::Write;
use std::time::Instant;

use crate::process::{assert_clear_failure, error_line, Finished};

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a valid value")),
        Err(_) => default,
    }
}

/// Faults injected per scenario.
pub fn faults_per_scenario() -> usize {
    env_or("SAE_FAULT_KILLS", 2)
}

pub fn campaign_seed() -> u64 {
    env_or("SAE_FAULT_SEED", 13)
}

/// The store's splitmix64, seeded from the campaign seed and the scenario's name, so that
/// scenarios running side by side do not share one sequence and each is reproducible alone.
pub struct Rng(store::SplitMix64);

impl Rng {
    pub fn for_scenario(name: &str) -> Rng {
        let mut h = campaign_seed() ^ 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(store::SplitMix64::from_seed(h))
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [lo, hi].
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// What one scenario saw, printed as its summary line.
pub struct Tally {
    pub scenario: &'static str,
    pub started: Instant,
    pub planned: usize,
    /// Faults that hit a running process (a kill that came after the process had finished
    /// does not count).
    pub landed: usize,
    /// Final results compared with the uninterrupted run, and how many were equal.
    pub compared: usize,
    pub identical: usize,
    /// Runs that a fault made fail, each clearly (checked before counting).
    pub clear_failures: usize,
    /// `panicked at` in any process's stderr.
    pub panics: Vec<String>,
    /// The first clear failure's message, as an example for the report.
    pub example_failure: Option<String>,
}

impl Tally {
    pub fn new(scenario: &'static str) -> Tally {
        Tally {
            scenario,
            started: Instant::now(),
            planned: faults_per_scenario(),
            landed: 0,
            compared: 0,
            identical: 0,
            clear_failures: 0,
            panics: Vec::new(),
            example_failure: None,
        }
    }

    /// Every finished process goes through here, so that no panic goes unseen.
    pub fn saw(&mut self, run: &Finished) {
        if let Some(line) = run.stderr.lines().find(|l| l.contains("panicked at")) {
            self.panics.push(line.to_string());
        }
    }

    pub fn compared(&mut self, identical: bool) {
        self.compared += 1;
        self.identical += identical as usize;
    }

    /// A run that a fault made fail: it must fail clearly, naming `names_one_of`.
    pub fn failed_clearly(&mut self, run: &Finished, names_one_of: &[&str]) {
        assert_clear_failure(run, names_one_of);
        self.clear_failures += 1;
        if self.example_failure.is_none() {
            self.example_failure = Some(error_line(run));
        }
    }

    pub fn report(self) {
        let line = format!(
            "faults: {:<34} | faults {:>2}/{:<2} landed and survived | runs identical {:>2}/{:<2} | clear failures {:>2} | panics {} | {:.0} s",
            self.scenario,
            self.landed,
            self.planned,
            self.identical,
            self.compared,
            self.clear_failures,
            self.panics.len(),
            self.started.elapsed().as_secs_f64(),
        );
        println!("{line}");
        if let Some(example) = &self.example_failure {
            println!("faults: {:<34} | example failure: {example}", self.scenario);
        }
        if let Ok(path) = std::env::var("SAE_FAULT_SUMMARY") {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
            let mut text = format!("{line}\n");
            if let Some(example) = &self.example_failure {
                text.push_str(&format!("faults: {:<34} | example failure: {example}\n", self.scenario));
            }
            f.write_all(text.as_bytes()).unwrap();
        }
        assert!(self.panics.is_empty(), "{}: panics: {:?}", self.scenario, self.panics);
        assert_eq!(self.identical, self.compared, "{}: a final result differs", self.scenario);
    }
}
