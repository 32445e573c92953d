//! Reading and making flex tensors in the CPU kernels.

use burn::backend::flex::FlexTensor;
use burn::backend::DispatchDevice;
use burn::tensor::Device;

/// `t` laid out contiguously: itself when it already is, else a copy.
pub fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A 2-d tensor with non-negative strides, read in place by the matmul kernels (copied when it
/// has a negative one).
pub fn readable(t: FlexTensor) -> FlexTensor {
    if t.layout().strides().iter().all(|&s| s >= 0) {
        t
    } else {
        t.to_contiguous()
    }
}

/// Whether `device`, or the device under its autodiff, is flex.
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}
