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

/// `f32`, `bf16` or `f16`; `None` means f32 on CPU and bf16 on CUDA.
pub fn parse_dtype(spec: Option<&str>, device: Device) -> Result<Kind> {
    Ok(match spec {
        None if device == Device::Cpu => Kind::Float,
        None => Kind::BFloat16,
        Some("f32" | "float32") => Kind::Float,
        Some("bf16" | "bfloat16") => Kind::BFloat16,
        Some("f16" | "float16") => Kind::Half,
        Some(s) => return Err(Error::UnknownDtype { spec: s.to_string() }),
    })
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
