//! Comparing what is stored with what a command asks for, field by field, so every refusal of
//! "another dataset" or "another configuration" names what differs in the same words.

use std::collections::BTreeSet;

use serde_json::Value;

/// One `path: there X, here Y` for every leaf that differs between `there` (what the
/// destination holds) and `here` (what this command asks for), in key order. Paths join object
/// keys with `.`; anything other than an object (an array, say) is compared whole, and a key
/// present on one side only is `null` on the other. Empty when they are equal.
pub fn differences(there: &Value, here: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(String::new(), there, here, &mut out);
    out
}

fn walk(path: String, there: &Value, here: &Value, out: &mut Vec<String>) {
    match (there, here) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                walk(p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
            }
        }
        _ if there != here => out.push(format!("{path}: there {there}, here {here}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::differences;

    #[test]
    fn names_each_differing_leaf_by_its_path() {
        let there = json!({ "a": 1, "b": { "c": "x", "d": [1, 2] }, "gone": true });
        let here = json!({ "a": 1, "b": { "c": "y", "d": [1, 3] }, "new": 2 });
        assert_eq!(
            differences(&there, &here),
            [
                "b.c: there \"x\", here \"y\"",
                "b.d: there [1,2], here [1,3]",
                "gone: there true, here null",
                "new: there null, here 2"
            ]
        );
        assert!(differences(&there, &there).is_empty());
    }
}
