//! Mixed corpora: the documents of several groups of inputs (for example one per language)
//! interleaved in a fixed cycle, so that every prefix of the corpus — whatever number of tokens
//! a capture stops at — holds the groups in the same proportions, run after run.
//!
//! The multilingual fortunes corpus ([`CorpusSpec::multilingual_fortunes`]) is the one built in:
//! Debian's English, German, Spanish and Chinese fortunes, [`FORTUNE_CYCLE`] documents of each per
//! cycle.

use std::path::Path;

use super::{CorpusFormat, CorpusSpec, FORTUNES_DIR};
use crate::error::Result;

/// A mix that cannot be read as given: each variant names the group, input or language.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    #[error("mix group `{group}` takes 0 documents per cycle")]
    EmptyGroup { group: String },
    #[error("corpus input {input} is in two mix groups")]
    InputInTwoGroups { input: usize },
    #[error("mix group `{group}` names input {input}, but the corpus has {inputs} inputs")]
    NoSuchInput { group: String, input: usize, inputs: usize },
    #[error("corpus input {input} is in no mix group")]
    InputInNoGroup { input: usize },
    #[error("no fortunes in language `{language}`: the fortunes packages hold {known}")]
    UnknownLanguage { language: String, known: String },
    #[error("{missing} is missing: install Debian's `{package}` package (make setup)")]
    MissingFortunes { missing: String, package: &'static str },
    #[error("no fortune languages given")]
    NoLanguages,
}

/// One group of a mix: a name (a language code for the fortunes), the inputs it reads (indexes
/// into [`CorpusSpec::inputs`]), and how many of its documents come per cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MixGroup {
    pub name: String,
    pub inputs: Vec<usize>,
    pub documents_per_cycle: u32,
}

/// How a mixed corpus interleaves its groups: each cycle takes `documents_per_cycle` documents
/// of the first group, then of the second, and so on. A group that runs out leaves the cycle
/// and the others go on. Every input belongs to exactly one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix {
    pub groups: Vec<MixGroup>,
}

impl Mix {
    /// The group an input belongs to.
    pub fn group_of_input(&self, input: usize) -> Option<&MixGroup> {
        self.groups.iter().find(|g| g.inputs.contains(&input))
    }

    /// A line that enters the corpus fingerprint, so another mix is another corpus.
    pub(super) fn fingerprint_line(&self) -> String {
        let groups: Vec<String> = self
            .groups
            .iter()
            .map(|g| {
                let inputs: Vec<String> = g.inputs.iter().map(|i| i.to_string()).collect();
                format!("{}:{}:{}", g.name, g.documents_per_cycle, inputs.join(","))
            })
            .collect();
        format!("mix={}\n", groups.join(";"))
    }

    pub(super) fn check(&self, inputs: usize) -> Result<()> {
        let mut seen = vec![false; inputs];
        for g in &self.groups {
            if g.documents_per_cycle == 0 {
                return Err(MixError::EmptyGroup { group: g.name.clone() }.into());
            }
            for &i in &g.inputs {
                match seen.get_mut(i) {
                    Some(s) if !*s => *s = true,
                    Some(_) => return Err(MixError::InputInTwoGroups { input: i }.into()),
                    None => return Err(MixError::NoSuchInput { group: g.name.clone(), input: i, inputs }.into()),
                }
            }
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(MixError::InputInNoGroup { input: i }.into());
        }
        Ok(())
    }
}

/// Languages of Debian's fortunes packages, and documents of each per cycle of the multilingual
/// corpus. The counts make the token shares roughly 40% English, 25% German, 20% Spanish, 15%
/// Chinese (a Spanish fortune is about half as long as an English one, and a Chinese one, mostly
/// classical poems, about six times as many tokens); the shares as measured are in README.md.
pub const FORTUNE_CYCLE: [(&str, u32); 4] = [("en", 16), ("de", 8), ("es", 12), ("zh", 1)];

/// The Chinese files of `fortunes-zh`, at the top of the fortunes folder.
pub const CHINESE_FORTUNE_FILES: [&str; 3] = ["chinese", "song100", "tang300"];

impl CorpusSpec {
    /// The multilingual demo corpus: Debian's fortunes in `languages` (codes of
    /// [`FORTUNE_CYCLE`], in that cycle's order whatever the order given), interleaved.
    pub fn multilingual_fortunes(languages: &[String]) -> Result<Self> {
        Self::multilingual_fortunes_in(Path::new(FORTUNES_DIR), languages)
    }

    pub fn multilingual_fortunes_in(dir: &Path, languages: &[String]) -> Result<Self> {
        for l in languages {
            if !FORTUNE_CYCLE.iter().any(|(code, _)| code == l) {
                let known: Vec<&str> = FORTUNE_CYCLE.iter().map(|(c, _)| *c).collect();
                return Err(MixError::UnknownLanguage { language: l.clone(), known: known.join(", ") }.into());
            }
        }
        let mut inputs: Vec<String> = Vec::new();
        let mut groups = Vec::new();
        let mut parts = Vec::new();
        for (code, per_cycle) in FORTUNE_CYCLE.iter().filter(|(c, _)| languages.iter().any(|l| l == c)) {
            let (files, package): (Vec<String>, &str) = match *code {
                "en" => (Self::english_fortunes_in(dir)?.inputs, "fortunes"),
                "zh" => {
                    (CHINESE_FORTUNE_FILES.iter().map(|f| dir.join(f).display().to_string()).collect(), "fortunes-zh")
                }
                other => (
                    vec![dir.join(other).display().to_string()],
                    if other == "de" { "fortunes-de" } else { "fortunes-es" },
                ),
            };
            if let Some(missing) = files.iter().find(|f| !Path::new(f).exists()) {
                return Err(MixError::MissingFortunes { missing: missing.clone(), package }.into());
            }
            let first = inputs.len();
            inputs.extend(files);
            groups.push(MixGroup {
                name: code.to_string(),
                inputs: (first..inputs.len()).collect(),
                documents_per_cycle: *per_cycle,
            });
            parts.push(format!("{code} {per_cycle}"));
        }
        if groups.is_empty() {
            return Err(MixError::NoLanguages.into());
        }
        let name = format!("fortunes of {} mixed, documents per cycle: {}", dir.display(), parts.join(", "));
        Ok(CorpusSpec { name, mix: Some(Mix { groups }), ..CorpusSpec::new(inputs, CorpusFormat::Fortune) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Corpus;

    fn group(name: &str, inputs: Vec<usize>, documents_per_cycle: u32) -> MixGroup {
        MixGroup { name: name.into(), inputs, documents_per_cycle }
    }

    #[test]
    fn documents_come_in_cycles_and_a_group_that_runs_out_leaves_the_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, docs: &[&str]| {
            let path = dir.path().join(name);
            std::fs::write(&path, docs.join("\n%\n") + "\n").unwrap();
            path.display().to_string()
        };
        let inputs = vec![write("a", &["a1", "a2", "a3", "a4", "a5"]), write("b", &["b1"]), write("c", &["b2"])];
        let mix = Mix { groups: vec![group("A", vec![0], 2), group("B", vec![1, 2], 1)] };
        let spec = CorpusSpec { mix: Some(mix.clone()), ..CorpusSpec::new(inputs.clone(), CorpusFormat::Fortune) };
        let (docs, stats) = Corpus::open(spec.clone()).unwrap().read_all().unwrap();
        let texts: Vec<&str> = docs.iter().map(|d| d.text.trim()).collect();
        assert_eq!(texts, ["a1", "a2", "b1", "a3", "a4", "b2", "a5"]);
        assert_eq!((stats.documents, stats.files_read), (7, 3));
        // Another mix of the same files is another corpus.
        let plain = CorpusSpec::new(inputs.clone(), CorpusFormat::Fortune);
        let fingerprint = |s: CorpusSpec| Corpus::open(s).unwrap().fingerprint().unwrap().sha256;
        let other = Mix { groups: vec![group("A", vec![0], 3), group("B", vec![1, 2], 1)] };
        let mixed = fingerprint(spec.clone());
        assert_ne!(mixed, fingerprint(plain));
        assert_ne!(mixed, fingerprint(CorpusSpec { mix: Some(other), ..spec.clone() }));
        assert_eq!(mixed, fingerprint(spec));
    }

    #[test]
    fn a_mix_must_cover_each_input_once() {
        for (groups, want) in [
            (vec![group("A", vec![0], 1)], "input 1 is in no mix group"),
            (vec![group("A", vec![0, 1], 1), group("B", vec![1], 1)], "in two mix groups"),
            (vec![group("A", vec![0, 1, 2], 1)], "names input 2"),
            (vec![group("A", vec![0, 1], 0)], "0 documents per cycle"),
        ] {
            let err = Mix { groups }.check(2).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let err = CorpusSpec::multilingual_fortunes(&["fr".to_string()]).unwrap_err().to_string();
        assert!(err.contains("`fr`"), "{err}");
    }
}
