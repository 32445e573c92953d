//! Does nuwa compute the same on every device? The same model, weights, batches and optimizer
//! steps on two or more devices in one process (or dumps written on different machines, or by
//! another implementation), compared tensor by tensor — forward activations module by module
//! and op by op, router choices, every gradient, every weight after the step — and the loss
//! over several steps. The report names the first tensor where two devices part.

pub mod capture;
pub mod compare;
pub mod dump;
pub mod hooks;
pub mod report;

pub use capture::{initial_weights, run_on, DeviceRun, Recipe, Target};
pub use compare::{compare, compare_runs, Distance, PairReport, Tolerance};
pub use dump::{Dump, Entry, Kind};
pub use report::{Determinism, DeviceSummary, Report};

/// Runs `recipe` on every target from `weights` (or the recipe's seeded initialisation) and
/// compares each with the first.
pub fn run_targets(
    recipe: &Recipe,
    targets: &[Target],
    weights: Option<std::collections::BTreeMap<String, nuwa_model::weights::HostTensor>>,
    perturb: Option<(usize, nuwa_model::trace::Perturbation)>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<(Report, Vec<DeviceRun>)> {
    let Some(first) = targets.first() else {
        anyhow::bail!("--devices: name at least two devices");
    };
    let weights = match weights {
        Some(w) => w,
        None => initial_weights(recipe, &first.device)?,
    };
    let mut runs = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        progress(&target.name);
        let perturb = perturb.as_ref().filter(|p| p.0 == i).map(|p| p.1.clone());
        runs.push(run_on(target, recipe, &weights, perturb)?);
    }
    let reference = &runs[0];
    let pairs = runs[1..]
        .iter()
        .map(|r| {
            compare_runs(
                &r.dump,
                &reference.dump,
                &r.losses,
                &reference.losses,
                &r.routes,
                &reference.routes,
                &Tolerance::F32,
            )
        })
        .collect();
    let devices = runs
        .iter()
        .map(|r| DeviceSummary {
            name: r.name.clone(),
            seconds: r.seconds,
            tokens_per_s: r.tokens_per_s,
            final_loss: r.losses.last().copied().unwrap_or(f64::NAN),
        })
        .collect();
    let m = &recipe.model;
    let report = Report {
        recipe: format!(
            "Model: {} layers × {} wide, {} heads ({} key/value), vocabulary {}, {}; batch {} × {} \
             random tokens (seed {}); {} AdamW step(s) at lr {}. The first step is compared \
             tensor by tensor, every step's loss is compared.",
            m.num_hidden_layers,
            m.hidden_size,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.vocab_size,
            if m.num_experts > 0 {
                format!("{} experts top-{}", m.num_experts, m.num_experts_per_tok)
            } else {
                "dense".to_string()
            },
            recipe.batch_size,
            recipe.seq_len,
            recipe.seed,
            recipe.steps,
            recipe.lr
        ),
        devices,
        pairs,
        determinism: Vec::new(),
    };
    Ok((report, runs))
}

/// Runs `recipe` on `target` again from `weights` and says whether it repeated `first` bit
/// for bit.
pub fn repeat_run(
    recipe: &Recipe,
    target: &Target,
    weights: &std::collections::BTreeMap<String, nuwa_model::weights::HostTensor>,
    first: &DeviceRun,
) -> anyhow::Result<Determinism> {
    let again = run_on(target, recipe, weights, None)?;
    let d = compare(
        &again.dump,
        &first.dump,
        &again.losses,
        &first.losses,
        &Tolerance::F32,
    );
    Ok(Determinism {
        device: target.name.clone(),
        differing: d.entries.iter().map(|e| e.distance.differing).sum(),
        elements: d
            .entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum(),
        losses_equal: again.losses == first.losses,
    })
}
