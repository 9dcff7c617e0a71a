//! The documents of a corpus, file after file — or, for a mixed corpus ([`super::Mix`]), group
//! after group in a fixed cycle — which files are skipped, which end the corpus with an error,
//! and the read counts.

use super::records::{FileError, FileRecords};
use super::{Corpus, DocId, Document, ReadStats, SkippedFile};
use crate::error::{Error, Result};

/// The documents of a corpus, in order. After the last one, [`Documents::stats`] holds the
/// counts. Yields an error for a malformed file or an unreadable named file, then stops.
pub struct Documents {
    pub(super) corpus: Corpus,
    /// One cursor per mix group, in the mix's order; one cursor over every file otherwise.
    pub(super) cursors: Vec<Cursor>,
    /// Documents each cursor gives per cycle.
    pub(super) per_cycle: Vec<u32>,
    /// The cursor whose turn it is, and how many documents it gave in this turn.
    pub(super) turn: usize,
    pub(super) taken: u32,
    pub(super) failed: bool,
    pub(super) stats: ReadStats,
}

/// Reads the files `files` (indexes into the corpus listing), in order.
pub(super) struct Cursor {
    pub(super) files: Vec<usize>,
    pub(super) next: usize,
    /// The file being read (its index in the listing) and its records still to come.
    pub(super) pending: Option<(u32, FileRecords)>,
}

impl Cursor {
    pub(super) fn new(files: Vec<usize>) -> Self {
        Cursor { files, next: 0, pending: None }
    }

    /// The next document of these files; `None` when they are all read.
    fn next(&mut self, corpus: &Corpus, stats: &mut ReadStats) -> Option<Result<Document>> {
        loop {
            if let Some((file_id, records)) = &mut self.pending {
                match records.next() {
                    Some(Ok((record, text))) => {
                        stats.documents += 1;
                        return Some(Ok(Document { id: DocId { file: *file_id, record }, text }));
                    }
                    Some(Err(e)) => {
                        // A file that passed its UTF-8 pass but failed later (a malformed record,
                        // or an I/O error mid-file) ends the corpus with an error.
                        let location = corpus.files[*file_id as usize].location.clone();
                        return Some(Err(match e {
                            FileError::Bad(e) => e,
                            FileError::Unreadable(reason) => Error::ReadCorpusFile { location, reason },
                        }));
                    }
                    None => self.pending = None,
                }
            }
            let index = *self.files.get(self.next)?;
            let file = corpus.files[index].clone();
            self.next += 1;
            match corpus.read_file(&file) {
                Ok(records) => {
                    stats.files_read += 1;
                    stats.bytes += file.size;
                    self.pending = Some((index as u32, records));
                }
                Err(FileError::Unreadable(reason)) if !file.named => {
                    tracing::warn!(file = %file.location, %reason, "skipping corpus file");
                    stats.skipped.push(SkippedFile { location: file.location.clone(), reason });
                }
                Err(FileError::Unreadable(reason)) => {
                    return Some(Err(Error::ReadCorpusFile { location: file.location, reason }));
                }
                Err(FileError::Bad(e)) => return Some(Err(e)),
            }
        }
    }
}

impl Documents {
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }
}

impl Iterator for Documents {
    type Item = Result<Document>;

    /// The current cursor's next document while its turn lasts; a cursor that runs out leaves
    /// the cycle, and the others go on in their proportions.
    fn next(&mut self) -> Option<Self::Item> {
        while !self.failed && !self.cursors.is_empty() {
            if self.taken >= self.per_cycle[self.turn] {
                self.turn = (self.turn + 1) % self.cursors.len();
                self.taken = 0;
                continue;
            }
            match self.cursors[self.turn].next(&self.corpus, &mut self.stats) {
                Some(Ok(doc)) => {
                    self.taken += 1;
                    return Some(Ok(doc));
                }
                Some(Err(e)) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                None => {
                    self.cursors.remove(self.turn);
                    self.per_cycle.remove(self.turn);
                    self.taken = 0;
                    if self.turn >= self.cursors.len() {
                        self.turn = 0;
                    }
                }
            }
        }
        None
    }
}
