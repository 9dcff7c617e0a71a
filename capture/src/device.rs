//! `--device` and `--dtype`, parsed the same way by every command that runs the model.

use tch::{Device, Kind};

use crate::error::{Error, Result};

/// `cpu`, `cuda` or `cuda:N`; `None` means CUDA when a GPU is visible, else CPU.
pub fn parse_device(spec: Option<&str>) -> Result<Device> {
    let device = match spec {
        None => return Ok(Device::cuda_if_available()),
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(s) => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(Error::UnknownDevice { spec: s.to_string() }),
        },
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count() as usize;
        if n >= count {
            return Err(Error::NoSuchCudaDevice { index: n, visible: count });
        }
    }
    Ok(device)
}

/// `f32`, `bf16` or `f16`; `None` means bf16 on CUDA, bf16 on a CPU with native bf16 arithmetic
/// ([`cpu_has_native_bf16`]) and f32 on other CPUs.
pub fn parse_dtype(spec: Option<&str>, device: Device) -> Result<Kind> {
    Ok(match spec {
        None if device == Device::Cpu && !cpu_has_native_bf16() => Kind::Float,
        None => Kind::BFloat16,
        Some("f32" | "float32") => Kind::Float,
        Some("bf16" | "bfloat16") => Kind::BFloat16,
        Some("f16" | "float16") => Kind::Half,
        Some(s) => return Err(Error::UnknownDtype { spec: s.to_string() }),
    })
}

/// Whether this CPU computes bf16 natively (x86-64 with AVX512-BF16, which every CPU with AMX
/// also has). There libtorch's bf16 forward measured 2.1× its f32 one (BENCHMARKS.md, issue 16
/// §3); elsewhere bf16 is emulated and slower than f32, so f32 stays the default.
pub fn cpu_has_native_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The `--dtype` spelling of a compute dtype (`f32`, `bf16`, `f16`; other kinds by their tch name).
pub fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Half => "f16".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_default_is_bf16_exactly_where_the_cpu_has_native_bf16() {
        let expected = if cpu_has_native_bf16() { Kind::BFloat16 } else { Kind::Float };
        assert_eq!(parse_dtype(None, Device::Cpu).unwrap(), expected);
        assert_eq!(parse_dtype(Some("f32"), Device::Cpu).unwrap(), Kind::Float);
        assert_eq!(parse_dtype(Some("bf16"), Device::Cpu).unwrap(), Kind::BFloat16);
    }

    #[test]
    fn dtype_names_read_back_as_the_same_dtype() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            assert_eq!(parse_dtype(Some(&dtype_name(kind)), Device::Cpu).unwrap(), kind);
        }
    }
}
