//! A progress bar for loading weights (`server`, `corolla`): bytes of the tensors read so
//! far against those to read. Drawn on stderr, and not at all when stderr is not a terminal.

use std::collections::BTreeSet;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

use crate::quant::QuantMatrix;
use crate::weights::{HostTensor, StoredRange, StoredTensor, WeightError, WeightSource};

/// Another source, counting the bytes of every tensor read into a bar.
pub struct LoadBar {
    inner: Arc<dyn WeightSource>,
    bar: ProgressBar,
}

impl LoadBar {
    /// Wraps `inner` with a bar whose length is the stored size of `names` (what is about to
    /// be loaded); `what` names it (`blocks 0..2`).
    pub fn wrap(inner: Arc<dyn WeightSource>, names: &[String], what: &str) -> Arc<LoadBar> {
        let total: u64 = names
            .iter()
            .filter_map(|n| inner.stored(n).ok())
            .map(|s| s.byte_len)
            .sum();
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({eta})")
        {
            bar.set_style(style);
        }
        bar.set_message(format!("loading {what}"));
        Arc::new(LoadBar { inner, bar })
    }

    /// Makes `names` local first (downloads, with their own bars), then wraps `source`.
    pub fn fetch_and_wrap(
        source: &Arc<dyn WeightSource>,
        names: &[String],
        what: &str,
    ) -> Result<Arc<LoadBar>, WeightError> {
        source.fetch_tensors(names)?;
        Ok(Self::wrap(source.clone(), names, what))
    }

    /// Clears the bar (the log says what was loaded).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn count(&self, name: &str) {
        if let Ok(s) = self.inner.stored(name) {
            self.bar.inc(s.byte_len);
        }
    }
}

impl WeightSource for LoadBar {
    fn names(&self) -> BTreeSet<String> {
        self.inner.names()
    }

    fn read(&self, name: &str) -> Result<HostTensor, WeightError> {
        let t = self.inner.read(name)?;
        self.count(name);
        Ok(t)
    }

    fn stored(&self, name: &str) -> Result<StoredTensor, WeightError> {
        self.inner.stored(name)
    }

    fn read_stored(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), WeightError> {
        self.inner.read_stored(name, offset, buf)
    }

    fn prefetch_stored(&self, ranges: &[StoredRange]) -> Result<(), WeightError> {
        self.inner.prefetch_stored(ranges)
    }

    fn fetch_tensors(&self, names: &[String]) -> Result<(), WeightError> {
        self.inner.fetch_tensors(names)
    }

    fn read_quant(&self, name: &str) -> Result<Option<QuantMatrix>, WeightError> {
        let q = self.inner.read_quant(name)?;
        if q.is_some() {
            self.count(name);
        }
        Ok(q)
    }
}
