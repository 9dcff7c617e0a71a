//! The data-parallel collectives the loop needs, as no-ops for a single process.

use tch::{Device, Kind, Tensor};

use super::{MemberRun, TrainError};
use crate::dist::ProcessGroup;

/// The data-parallel collectives the loop needs; without a group (one process) each is the
/// identity.
#[derive(Clone, Copy)]
pub(super) struct Collectives<'a> {
    pub(super) group: Option<&'a ProcessGroup>,
    /// Where the small flag tensors live (NCCL takes CUDA tensors only).
    pub(super) device: Device,
}

impl Collectives<'_> {
    /// Averages the gradients of `params` over the ranks, so every rank takes the same step.
    pub(super) fn mean_gradients(&self, params: &[(String, Tensor)]) -> Result<(), TrainError> {
        let Some(group) = self.group else { return Ok(()) };
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        group.all_reduce_mean(&grads.iter().collect::<Vec<_>>())?;
        Ok(())
    }

    pub(super) fn mean(&self, tensors: &[&Tensor]) -> Result<(), TrainError> {
        if let Some(group) = self.group {
            group.all_reduce_mean(tensors)?;
        }
        Ok(())
    }

    /// [d_sae] Bool: fired on any rank.
    pub(super) fn any_fired(&self, fired: Tensor) -> Result<Tensor, TrainError> {
        let Some(group) = self.group else { return Ok(fired) };
        let counts = fired.to_kind(Kind::Float);
        group.all_reduce_sum(&[&counts])?;
        Ok(counts.gt(0.0))
    }

    /// Whether `flag` holds on any rank.
    pub(super) fn any(&self, flag: bool) -> Result<bool, TrainError> {
        let Some(group) = self.group else { return Ok(flag) };
        let t = Tensor::from_slice(&[flag as i64]).to_device(self.device);
        group.all_reduce_sum(&[&t])?;
        Ok(t.int64_value(&[0]) > 0)
    }

    /// Rank 0's value of `value` on every rank.
    pub(super) fn agree(&self, value: u64) -> Result<u64, TrainError> {
        let Some(group) = self.group else { return Ok(value) };
        let t = Tensor::from_slice(&[value as i64]).to_device(self.device);
        group.broadcast(&[&t], 0)?;
        Ok(t.int64_value(&[0]) as u64)
    }

    pub(super) fn broadcast(&self, named: &[(String, Tensor)]) -> Result<(), TrainError> {
        let Some(group) = self.group else { return Ok(()) };
        group.broadcast(&named.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?;
        Ok(())
    }

    /// Every rank's unlogged metric sums for a checkpoint, stacked [world, 5] (rank r's in row r;
    /// one process: its own [5]). Each rank resumes its own sums, so the next row's all-rank mean
    /// is computed in the same order as in a run never interrupted; averaging them here instead
    /// changed that row's last bits. Adding the other ranks' zeros is exact.
    pub(super) fn gather_pending_metrics(&self, run: &MemberRun) -> Result<Option<Tensor>, TrainError> {
        let (Some(sums), _) = run.acc.pending() else { return Ok(None) };
        let Some(group) = self.group else { return Ok(Some(sums)) };
        let stacked = Tensor::zeros([group.world_size() as i64, sums.size()[0]], (sums.kind(), sums.device()));
        stacked.get(group.rank() as i64).copy_(&sums);
        group.all_reduce_sum(&[&stacked])?;
        Ok(Some(stacked))
    }

    /// Averages the unlogged metric sums over ranks, so the logged means cover every rank's rows.
    pub(super) fn mean_pending_metrics(&self, run: &mut MemberRun) -> Result<(), TrainError> {
        if let (Some(_), (Some(sums), _)) = (self.group, run.acc.pending()) {
            self.mean(&[&sums])?;
            run.acc.replace_sums(sums);
        }
        Ok(())
    }
}
