"""What an MLflow run logged, in a form two runs of the same training can be compared by: the integration
tests that interrupt, resume or parallelise runs check that they log what an undisturbed run logs."""

TIMINGS = ("step_time", "tokens_per_s", "peak_mem")  # perf/* and their final/* summaries: not reproducible


def logged(client, run) -> dict:
    """metric -> {step: the last value logged at that step} (a resumed run logs the steps after its
    checkpoint again), timings left out."""
    out = {}
    for key in run.data.metrics:
        if any(t in key for t in TIMINGS):
            continue
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
        out[key] = {m.step: m.value for m in history}
    return out
