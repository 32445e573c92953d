//! `--device cpu | cuda:N | rocm:N | vulkan:N | wgpu:N | metal:N`: the Burn device to run on.
//! Each GPU kind needs its cargo feature; asking for one that is not compiled in says which.
//! `cpu` is the fastest CPU backend built in (flex); `flex` and `ndarray` name a CPU backend
//! explicitly (a build with both can compare them: `nuwa parity --devices cpu,ndarray`).
//! `wgpu:N` is the N-th adapter wgpu finds, whatever its kind: on a machine whose only
//! Vulkan driver is a software one (Mesa's lavapipe), `wgpu:0` is that CPU adapter.

use anyhow::{bail, Result};
use burn::tensor::Device;

/// Parses a device name into a Burn device.
pub fn parse_device(name: &str) -> Result<Device> {
    #[allow(unused_variables)]
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let index: usize = i
                .parse()
                .map_err(|_| anyhow::anyhow!("--device {name}: `{i}` is not a device index"))?;
            (k, index)
        }
        None => (name, 0),
    };
    let missing = |feature: &str| -> Result<Device> {
        bail!("--device {name}: this nuwa was built without the `{feature}` feature; rebuild with `cargo build --release --features {feature}`")
    };
    match kind {
        "cpu" if index == 0 => cpu_device(name),
        "cpu" => bail!("--device {name}: there is one CPU device; use `cpu`"),
        "flex" => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
            #[cfg(not(feature = "flex"))]
            return missing("flex");
        }
        "ndarray" => {
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            return Ok(Device::ndarray());
            #[cfg(not(feature = "ndarray"))]
            return missing("ndarray");
        }
        "cuda" => {
            #[cfg(feature = "cuda")]
            return Ok(Device::cuda(index));
            #[cfg(not(feature = "cuda"))]
            return missing("cuda");
        }
        "rocm" => {
            #[cfg(feature = "rocm")]
            return Ok(Device::rocm(index));
            #[cfg(not(feature = "rocm"))]
            return missing("rocm");
        }
        "vulkan" => {
            #[cfg(feature = "vulkan")]
            return Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(index)));
            #[cfg(not(feature = "vulkan"))]
            return missing("vulkan");
        }
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            return wgpu_adapter(name, index);
            #[cfg(not(feature = "wgpu"))]
            return missing("wgpu");
        }
        "metal" => {
            #[cfg(feature = "metal")]
            return Ok(Device::metal(burn::tensor::DeviceKind::DiscreteGpu(index)));
            #[cfg(not(feature = "metal"))]
            return missing("metal");
        }
        _ => bail!("--device {name}: unknown device kind `{kind}` (expected cpu, cuda:N, rocm:N, vulkan:N, wgpu:N, metal:N, flex or ndarray)"),
    }
}

/// The `index`-th adapter wgpu enumerates (discrete, integrated, virtual or CPU alike).
#[cfg(feature = "wgpu")]
fn wgpu_adapter(name: &str, index: usize) -> Result<Device> {
    let adapters = Device::enumerate(burn::tensor::DeviceType::Wgpu);
    match adapters.get(index) {
        Some(device) => Ok(device.clone()),
        None if adapters.is_empty() => bail!(
            "--device {name}: wgpu finds no adapter (no GPU driver; on a machine without a GPU, \
             Mesa's software Vulkan driver gives one: apt-get install mesa-vulkan-drivers)"
        ),
        None => bail!(
            "--device {name}: wgpu finds {} adapter(s), numbered from 0",
            adapters.len()
        ),
    }
}

fn cpu_device(name: &str) -> Result<Device> {
    #[cfg(feature = "flex")]
    {
        let _ = name;
        Ok(Device::flex())
    }
    #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
    {
        let _ = name;
        #[allow(deprecated)]
        Ok(Device::ndarray())
    }
    #[cfg(all(not(feature = "flex"), not(feature = "ndarray"), feature = "cpu"))]
    {
        let _ = name;
        Ok(Device::cpu())
    }
    #[cfg(not(any(feature = "flex", feature = "ndarray", feature = "cpu")))]
    bail!("--device {name}: this nuwa was built without a CPU backend; rebuild with `--features flex`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(parse_device("cpu").is_ok());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("unknown device kind"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a device index"), "{err}");
        #[cfg(not(feature = "cuda"))]
        {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
