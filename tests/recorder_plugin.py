"""Body of a test-only plugin distribution (installed into a temp dir with a dist-info, like a
third-party package): records, per rank, the teachers it built and a digest of the trained
student + heads, through the public ``radio_train_end`` hook."""
import atexit
import hashlib
import json
import os
import signal

from radio_core import hookimpl


def _record_exit(path):
    # Runs before interpreter teardown: a process group still alive here is left to that
    # teardown, where gloo's threads can abort a finished run (SIGABRT).
    import torch.distributed as dist

    path.write_text(json.dumps({"process_group_alive": dist.is_available() and dist.is_initialized()}))


@hookimpl
def radio_train_end(trainer):
    atexit.register(_record_exit, trainer.out_dir / f"exit_rank{trainer.accelerator.process_index}.json")
    # Under FSDP the weights are shards: gathered (a collective, so every rank calls it) and
    # recorded by the main process only.
    model = trainer.full_model() if trainer.sharded else trainer.unwrapped
    if model is None:
        return
    state = model.state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().float().numpy().tobytes())
    rank = trainer.accelerator.process_index
    (trainer.out_dir / f"record_rank{rank}.json").write_text(json.dumps({
        "teachers": sorted(trainer.teachers), "digest": digest.hexdigest(), "step": trainer.state.step,
        "world": trainer.accelerator.num_processes}))


@hookimpl
def radio_step_end(trainer, step, metrics):
    # RADIO_TEST_SIGTERM="step:rank": a real SIGTERM to one rank's own process at that step.
    # RADIO_TEST_SIGKILL="step:rank": a SIGKILL (no handler runs, no checkpoint), as a node
    # failure would; once per run (a marker file), so the restarted group runs through. Not by
    # TORCHELASTIC_RESTART_COUNT: each agent counts only its own workers' failures, so after a
    # restart the killed rank can land on a node whose count is still 0.
    marker = trainer.out_dir / "test_sigkill_sent"
    for var, sig in (("RADIO_TEST_SIGTERM", signal.SIGTERM), ("RADIO_TEST_SIGKILL", signal.SIGKILL)):
        spec = os.environ.get(var)
        if spec and (sig == signal.SIGTERM or not marker.exists()):
            at, rank = map(int, spec.split(":"))
            if step == at and trainer.accelerator.process_index == rank:
                if sig == signal.SIGKILL:
                    marker.touch()
                os.kill(os.getpid(), sig)

