//! The documents of a corpus, file after file: which files are skipped, which end the corpus
//! with an error, and the read counts.

use super::records::{FileError, FileRecords};
use super::{Corpus, DocId, Document, ReadStats, SkippedFile};
use crate::error::{Error, Result};

/// The documents of a corpus, in order. After the last one, [`Documents::stats`] holds the
/// counts. Yields an error for a malformed file or an unreadable named file, then stops.
pub struct Documents {
    pub(super) corpus: Corpus,
    pub(super) next_file: usize,
    /// The file being read (its index in the listing) and its records still to come.
    pub(super) pending: Option<(u32, FileRecords)>,
    pub(super) stats: ReadStats,
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

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((file_id, records)) = &mut self.pending {
                match records.next() {
                    Some(Ok((record, text))) => {
                        self.stats.documents += 1;
                        return Some(Ok(Document { id: DocId { file: *file_id, record }, text }));
                    }
                    Some(Err(e)) => {
                        // A file that passed its UTF-8 pass but failed later (a malformed record,
                        // or an I/O error mid-file) ends the corpus with an error.
                        let location = self.corpus.files[*file_id as usize].location.clone();
                        self.pending = None;
                        self.next_file = self.corpus.files.len();
                        return Some(Err(match e {
                            FileError::Bad(e) => e,
                            FileError::Unreadable(reason) => Error::ReadCorpusFile { location, reason },
                        }));
                    }
                    None => self.pending = None,
                }
            }
            let index = self.next_file;
            let file = self.corpus.files.get(index)?.clone();
            self.next_file += 1;
            match self.corpus.read_file(&file) {
                Ok(records) => {
                    self.stats.files_read += 1;
                    self.stats.bytes += file.size;
                    self.pending = Some((index as u32, records));
                }
                Err(FileError::Unreadable(reason)) if !file.named => {
                    tracing::warn!(file = %file.location, %reason, "skipping corpus file");
                    self.stats.skipped.push(SkippedFile { location: file.location.clone(), reason });
                }
                Err(FileError::Unreadable(reason)) => {
                    self.next_file = self.corpus.files.len();
                    return Some(Err(Error::ReadCorpusFile { location: file.location, reason }));
                }
                Err(FileError::Bad(e)) => {
                    self.next_file = self.corpus.files.len();
                    return Some(Err(e));
                }
            }
        }
    }
}
