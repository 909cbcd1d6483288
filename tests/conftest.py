"""Shared fixtures. Without CUDA the Triton kernels run in the interpreter (set before import)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config) -> str:
    """Which CPU code paths this run takes: CI runs the CPU-dependent tests twice, the second
    time with AVX-512/AMX masked (.ci/run)."""
    from fma_fast.core.environment import cpu_isa
    from fma_fast.solver import routing

    return (f"CPU ISA in effect: {cpu_isa()}; bf16 on BF16 units: "
            f"{routing.cpu_bf16_units()}")


OFFICIAL_FIXTURES = {
    "small": Path(__file__).resolve().parent / "fixtures" / "official_fma_small",
    "large": Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_fma",
}
"""Checkpoints in the released format with golden outputs of the released code: the small one
(D=64) is in the repo, so every clone runs the golden tests; the large one (D=512) lives
beside the checkout in ../shared and is used as well where it is there."""


@pytest.fixture(params=sorted(OFFICIAL_FIXTURES))
def official_fixture(request) -> Path:
    folder = OFFICIAL_FIXTURES[request.param]
    if not (folder / "golden.pt").is_file():
        if request.param == "small":
            pytest.fail(f"the in-repo golden fixture is missing: {folder}")
        pytest.skip(f"SKIPPED, not passed: the large official fixture is not at {folder}")
    return folder


@pytest.fixture
def golden(official_fixture: Path) -> dict:
    return torch.load(official_fixture / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (several times slower
    on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MARKED: dict[str, tuple[str, ...]] = {
    # Each over ~3 s on 2 cores (from --durations runs of the whole suite and of the rest); without
    # them,
    # `pytest -m "not slow"` is the fast subset of docs/contributing.md.
    "slow": (
        "test_benchmarks_harness.py::test_a_stage_past_its_box_is_stopped_with_sigint",
        "test_benchmarks_harness.py::test_gemm_only_chain_runs_the_folded_runtimes_gemms[37-16",
        "test_benchmarks_harness.py::test_gpu_check_completes_without_the_optional_plugins",
        "test_benchmarks_harness.py::test_run_py_interrupted_keeps_what_pytest_reported",
        "test_benchmarks_harness.py::test_run_py_without_pytest_benchmark_refuses_in_one_line",
        "test_benchmarks_harness.py::test_run_writes_tagged_results_and_fails_loudly",
        "test_benchmarks_harness.py::test_the_smoke_tests_exist",
        "test_checkpoint_io.py::test_identical_saves_write_identical_bytes",
        "test_checkpoint_io.py::test_orphaned_temporary_files_are_removed_by_the_next_write",
        "test_classifier.py",
        "test_cli.py::test_console_script_help_runs",
        "test_clip_data.py::test_base_to_new_keeps_the_first_half_of_all_classes_with_an_empty",
        "test_clip_pipeline.py",
        "test_cpu_compiled.py",
        "test_cpu_fused.py::test_linear_matches_x_weight_plus_bias[dtype1-1024-512-512]",
        "test_doctor.py::test_ci_isa_mask_check_fails_without_the_mask_and_passes_with_it",
        "test_doctor.py::test_doctor_reports_a_failing_kernel_and_exits_1",
        "test_doctor.py::test_doctor_runs_every_kernel_against_its_reference",
        "test_doctor.py::test_the_fp16_ensemble_check_leaves_room_for_a_gpus_rounding",
        "test_doctor.py::test_the_isa_mask_is_honoured_by_the_bf16_rule_and_the_doctor",
        "test_doctor.py::test_without_a_kernel_backend_the_checks_are_skipped_with_the_reason",
        "test_fit.py::test_fused_triton_training_matches_the_reference_loss_curve",
        "test_kernels_aot.py",
        "test_kernels_autotune.py::test_every_cosine_topk_candidate_matches_reference",
        "test_kernels_cosine_topk.py::test_cosine_topk_equals_reference[17-130-64-5]",
        "test_kernels_cosine_topk.py::test_cosine_topk_equals_reference[20-50-33-50]",
        "test_kernels_cosine_topk.py::test_cosine_topk_equals_reference[33-100-24-16]",
        "test_kernels_cosine_topk.py::test_equal_cosines_go_to_the_lower_class_index_in_rank",
        "test_kernels_cosine_topk.py::test_scoring_allocates_nothing_of_rows_times_classes",
        "test_kernels_cosine_topk.py::test_step_ensemble_equals_reference[18-21-33-21]",
        "test_kernels_cosine_topk.py::test_the_step_ensemble_kernel_keeps_the_same_tie_rule",
        "test_kernels_dispatch.py::test_every_kernel_and_candidate_fits_the_architecture",
        "test_kernels_dispatch.py::test_import_and_reference_paths_work_without_triton",
        "test_kernels_dispatch.py::test_without_interpreter_cpu_goes_to_reference",
        "test_kernels_flow_matching.py::test_noise_moments",
        "test_kernels_flow_matching.py::test_noise_reproducible_and_seed_dependent",
        "test_kernels_flow_matching.py::test_noise_uncorrelated_across_dims_rows_and_offsets",
        "test_kernels_flow_matching.py::test_pair_loss_and_grad_equal_reference[33-4-17",
        "test_kernels_folded_step.py::test_final_euler_update_matches_reference[70-40-40",
        "test_kernels_folded_step.py::test_residual_block_matches_reference[70-40-40",
        "test_kernels_launch.py::test_every_kernel_launches_inside_its_tensors_device_guard",
        "test_kernels_launch.py::test_the_seed_compiles_no_new_kernel_variant",
        "test_kernels_tf32_emulation.py::test_the_environment_variable_installs_it_at_import",
        "test_kernels_tf32_emulation.py::test_the_kernels_follow_each_dots_input_precision_only",
        "test_lora_tables.py::test_lora_prompts_default_to_a_photo_of_a",
        "test_official_checkpoint.py::test_predictions_for_every_m_match_golden[large]",
        "test_peft.py::test_each_source_runs_end_to_end_in_the_cli",
        "test_plan.py::test_bf16_predictions_agree_with_fp32_on_a_trained_field",
        "test_predict.py",  # its fixture runs fma-fast run on a tiny model
        "test_plan.py::test_released_size_network",
        "test_pretrained.py::test_a_classifier_on_a_tag_rebuilds_its_encoder_from_the_tag",
        "test_readme.py::test_the_image_tour_runs_as_written",
        "test_released_protocol.py",
        "test_report.py::test_plots_are_skipped_with_a_note_without_matplotlib",
        "test_report.py::test_render_only_rewrites_the_same_report_from_the_json",
        "test_report.py::test_report_",
        "test_score.py::test_a_job_killed_with_sigkill_resumes_to_the_bytes_of_an_uninterrupted",
        "test_score.py::test_malformed_headers_and_deep_json_are_one_line",
        "test_score.py::test_torchrun_writes_the_bytes_of_one_process",
        "test_solve.py::test_every_backend_equals_the_reference[triton",
        "test_solve.py::test_every_solve_path_gives_equal_cosines_to_the_lower_class[triton",
    ),
    # Start another Python process (a CLI, torchrun, a masked or bare interpreter).
    "subprocess": (
        "test_benchmarks_harness.py::test_run_writes_tagged_results_and_fails_loudly",
        "test_benchmarks_harness.py::test_gpu_check_",
        "test_benchmarks_harness.py::test_a_stage_past_its_box_is_stopped_with_sigint",
        "test_benchmarks_harness.py::test_the_smoke_tests_exist",
        "test_benchmarks_harness.py::test_run_py_",
        "test_checkpoint_io.py::test_identical_saves_write_identical_bytes",
        "test_checkpoint_io.py::test_orphaned_temporary_files_are_removed_by_the_next_write",
        "test_classifier.py::test_predict_in_a_fresh_process_equals_eval_on_extracted_features",
        "test_cli.py::test_console_script_help_runs",
        "test_clip_pipeline.py::test_torchrun_matches_single_process",
        "test_doctor.py::test_without_a_kernel_backend_the_checks_are_skipped_with_the_reason",
        "test_doctor.py::test_the_isa_mask_is_honoured_by_the_bf16_rule_and_the_doctor",
        "test_doctor.py::test_ci_isa_mask_check_fails_without_the_mask_and_passes_with_it",
        "test_kernels_aot.py",
        "test_kernels_dispatch.py::test_without_interpreter_cpu_goes_to_reference",
        "test_kernels_dispatch.py::test_import_and_reference_paths_work_without_triton",
        "test_kernels_tf32_emulation.py::test_the_environment_variable_installs_it_at_import",
        "test_readme.py::test_the_image_tour_runs_as_written",
        "test_score.py::test_torchrun_writes_the_bytes_of_one_process",
        "test_score.py::test_a_job_killed_with_sigkill_resumes_to_the_bytes_of_an_uninterrupted",
        "test_predict.py::test_a_job_killed_with_sigkill_resumes_to_the_same_bytes",
        "test_predict.py::test_torchrun_writes_the_bytes_of_one_process",
    ),
    # Compile ahead of time or with torch.compile (minutes cold).
    "compile": (
        "test_cpu_compiled.py",
        "test_kernels_aot.py",
        "test_kernels_dispatch.py::test_every_kernel_and_candidate_fits_the_architecture",
    ),
    # Need a CUDA GPU (skipped, and say so, without one).
    "cuda": (
        "test_cuda.py",
        "test_kernels_autotune.py::test_tuning_on_cuda_picks_a_candidate_once",
        "test_kernels_cosine_cross_entropy.py::test_half_precision",
        "test_kernels_cosine_topk.py::test_half_precision_inputs",
        "test_kernels_cosine_topk.py::test_fp32_default_precision_is_near_fp32_on_cuda",
        "test_kernels_euler.py::test_half_velocity_updates_fp32_state_and_half_state",
        "test_kernels_flow_matching.py::test_half_precision_io",
    ),
}
"""Test kinds, by node id prefix below tests/ (a module, a test, or a test with the start of
its parameters): assigned here in one table rather than by decorators across 30 files;
tests/test_structure.py checks that every entry still names a test."""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        node = item.nodeid.split("tests/", 1)[-1]
        for mark, prefixes in MARKED.items():
            if node.startswith(prefixes):
                item.add_marker(getattr(pytest.mark, mark))
