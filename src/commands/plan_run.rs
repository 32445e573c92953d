//! Running a plan file (`nuwa train --plan`, `nuwa launch --plan`): the checks that refuse a
//! plan this build or this job cannot run — one line naming the field — before any rank
//! starts, the device each rank trains on, and the plan as `nuwa train` flags.

use anyhow::{anyhow, bail, Result};
use nuwa_plan::planfile::backend_of;
use nuwa_plan::verify::local_cpu;
use nuwa_plan::{Catalogue, PlanFile};
use std::path::Path;

/// Whether this build has the backend `name`.
fn built_with(backend: &str) -> bool {
    match backend {
        "cpu" => true,
        "cuda" => cfg!(feature = "cuda"),
        "rocm" => cfg!(feature = "rocm"),
        "metal" => cfg!(feature = "metal"),
        _ => false,
    }
}

/// The backend each of the plan's device kinds trains on, refusing one this build lacks.
fn check_backends(plan: &PlanFile, path: &Path) -> Result<()> {
    let catalogue = Catalogue::load(None, local_cpu())?;
    for part in &plan.parts {
        let Some(entry) = catalogue.devices.get(&part.device) else {
            let known: Vec<&str> = catalogue.devices.keys().map(String::as_str).collect();
            bail!(
                "{}: [[part]] device {:?}: not in the catalogue (known: {})",
                path.display(),
                part.device,
                known.join(", ")
            );
        };
        let vendor = entry.vendor.clone();
        let backend = backend_of(&part.device, vendor.as_deref()).ok_or_else(|| {
            anyhow!(
                "{}: [[part]] device {:?}: no backend of nuwa drives it yet (Burn has CUDA, \
                 ROCm, Metal, Vulkan/wgpu and CPU backends)",
                path.display(),
                part.device
            )
        })?;
        if !built_with(backend) {
            bail!(
                "{}: [[part]] device {:?} trains on the {backend} backend, which this nuwa was \
                 built without (rebuild with `--features {backend}`)",
                path.display(),
                part.device
            );
        }
    }
    Ok(())
}

/// Loads `path` and checks it against its model and this build (not yet the job's ranks).
pub fn load_checked(path: &Path) -> Result<PlanFile> {
    let plan = PlanFile::load(path)?;
    let model = nuwa_config::model_by_name(&plan.model)
        .map_err(|e| anyhow!("{}: model: {e}", path.display()))?;
    plan.check_model(&model)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    check_backends(&plan, path)?;
    Ok(plan)
}

/// The device string of world rank `rank` under `plan` (`cpu`, or `cuda:N` with N the rank's
/// place on its node, as Open MPI numbers it).
pub fn device_of(plan: &PlanFile, rank: usize) -> String {
    let catalogue = Catalogue::load(None, local_cpu()).ok();
    let name = plan.device_of(rank);
    let vendor = catalogue
        .as_ref()
        .and_then(|c| c.devices.get(name))
        .and_then(|d| d.vendor.clone());
    match backend_of(name, vendor.as_deref()) {
        Some("cpu") | None => "cpu".to_string(),
        Some(backend) => {
            let local = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            format!("{backend}:{local}")
        }
    }
}

/// The plan as `nuwa train` flags (model, batch, layout), for a launcher that may restart
/// the job on another number of ranks.
pub fn train_flags(plan: &PlanFile) -> Vec<String> {
    let model_flag = match Path::new(&plan.model).exists() {
        true => "--model-config",
        false => "--preset",
    };
    let l = &plan.layout;
    [
        model_flag.to_string(),
        plan.model.clone(),
        "--seq-len".into(),
        plan.seq_len.to_string(),
        "--batch-size".into(),
        plan.batch_size().to_string(),
        "--grad-accum".into(),
        plan.grad_accum().to_string(),
        "--pp".into(),
        l.pp.to_string(),
        "--ep".into(),
        l.ep.to_string(),
    ]
    .to_vec()
}

/// Sets one `nuwa train` setting from the plan, refusing a flag that says otherwise.
pub fn take<T: PartialEq + std::fmt::Display + Copy>(
    flag: &str,
    given: &mut Option<T>,
    planned: T,
) -> Result<()> {
    match *given {
        Some(v) if v != planned => {
            bail!("{flag} {v}: the plan says {planned}; leave the flag out to run the plan")
        }
        _ => *given = Some(planned),
    }
    Ok(())
}
