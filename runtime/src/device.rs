//! Which device serves: `cpu`, or `cuda:N` — probed through the CUDA driver, loaded dynamically
//! (feature `cuda`), so a machine without a GPU or driver gets a clear error, not a crash.

use std::str::FromStr;

use crate::error::{DeviceError, Error, Result};

/// A device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU backend (candle-core).
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("{other:?} is not a device (cpu, cuda or cuda:N)")),
        }
    }
}

/// What the probe found on a CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// The ordinal.
    pub ordinal: usize,
    /// The device's name.
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    /// Device memory in bytes.
    pub memory_bytes: usize,
}

/// A failed driver call on device `ordinal`, its error kept as the source.
#[cfg(feature = "cuda")]
fn driver(ordinal: usize, what: &str, e: cudarc::driver::DriverError) -> Error {
    DeviceError::Driver { what: format!("cuda:{ordinal} {what}").trim_end().to_string(), source: Box::new(e) }.into()
}

/// Opens the CUDA driver and the device, or says why it cannot.
pub fn probe_cuda(ordinal: usize) -> Result<CudaDeviceInfo> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::sys::CUdevice_attribute as A;
        // SAFETY: only tries to dlopen the driver library by its known names; no symbol is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::from(DeviceError::Unavailable(format!(
                "cuda:{ordinal} is not available: no CUDA driver (libcuda.so) on this machine"
            ))));
        }
        let count = cudarc::driver::CudaContext::device_count().map_err(|e| driver(ordinal, "is not available", e))?;
        if ordinal >= count as usize {
            return Err(Error::from(DeviceError::Unavailable(format!(
                "cuda:{ordinal} is not available: this machine has {count} CUDA device(s)"
            ))));
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| driver(ordinal, "", e))?;
        let attr = |a| ctx.attribute(a).map_err(|e| driver(ordinal, "", e));
        Ok(CudaDeviceInfo {
            ordinal,
            name: ctx.name().map_err(|e| driver(ordinal, "", e))?,
            capability: (
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            memory_bytes: ctx.total_mem().map_err(|e| driver(ordinal, "", e))?,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::from(DeviceError::Unavailable(format!(
            "cuda:{ordinal} is not available: this openlora was built without the `cuda` feature"
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn probing_a_missing_gpu_is_an_error_not_a_crash() {
        // On machines with a GPU this finds it; everywhere else it must explain, not panic.
        match probe_cuda(0) {
            Ok(info) => assert!(info.memory_bytes > 0 && info.capability.0 >= 5, "{info:?}"),
            Err(e) => assert!(e.to_string().contains("cuda:0 is not available"), "{e}"),
        }
        assert!(probe_cuda(4096).is_err());
    }
}
