//! Training with data and sequence parallelism follows the single-device run: the same
//! loss at every step and the same weights after it (logical ranks on the CPU).

mod common;

use common::{assert_losses_follow, assert_updates_match, step_outputs, tiny_recipe, weights};

#[test]
fn sequence_and_data_parallel_runs_follow_the_single_device_run() {
    let tmp = tempfile::tempdir().unwrap();
    // A hybrid, so ring attention and state passing both train.
    let base = ["model.mixers=[\"softmax\",\"ssm\"]", "model.n_layers=2"];
    let recipe = |extra: &[&str]| {
        let mut all: Vec<&str> = base.to_vec();
        all.extend_from_slice(extra);
        tiny_recipe(tmp.path(), &all)
    };
    let steps = 5;
    let (reference, ref_before, ref_trainer) = step_outputs(&recipe(&[]), steps);
    let ref_after = weights(ref_trainer.model());
    for extra in [
        &["parallelism.sequence_parallel_degree=2"][..],
        &[
            "parallelism.sequence_parallel_degree=4",
            "parallelism.sequence_sharding=\"contiguous\"",
        ],
        &["parallelism.data_parallel_degree=2"],
        &[
            "parallelism.data_parallel_degree=2",
            "parallelism.sequence_parallel_degree=2",
        ],
    ] {
        let (outs, before, trainer) = step_outputs(&recipe(extra), steps);
        assert_losses_follow(&outs, &reference, 1e-5, &format!("{extra:?}"));
        assert_updates_match(
            &before,
            &weights(trainer.model()),
            &ref_before,
            &ref_after,
            1e-4,
            &format!("{extra:?}, {steps} steps"),
        );
    }
}
