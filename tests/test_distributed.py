"""Several processes on the CPU with gloo over loopback: same numbers as one process, resume
across world sizes, and a dead rank stops the run instead of hanging it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_train import settings

from minigpt2.formats.checkpoint import load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], cwd, script=None) -> list[subprocess.Popen]:
    """Start world ranks of train.py (or script) the way torchrun would (env://, loopback)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script or ROOT / "train.py"), *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs, timeout=90) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def run_world(world: int, args: list[str], cwd) -> None:
    for code, _, err in finish(launch(world, args, cwd)):
        assert code == 0, err


def model_weights(out_dir):
    return {
        k: v for k, v in load_file(out_dir / "ckpt.safetensors").items() if k.startswith("model.")
    }


def metrics(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir):
    rows = metrics(out_dir)
    return [r["train_loss"] for r in rows], [r["val_loss"] for r in rows]


def assert_same_run(a, b):
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=2e-6), k
    (ta, va), (tb, vb) = losses(a), losses(b)
    assert ta == pytest.approx(tb, abs=1e-5) and va == pytest.approx(vb, abs=1e-5)


def tiny(tmp_path, name, **kw):
    kw = {
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_iters": 4,
        "dropout": 0.0,
        "lr_decay_iters": 4,
        "eval_interval": 2,
        "checkpoint_interval": 2,
        "threads": 1,
        **kw,
    }
    args = settings(tmp_path, **kw)
    return [a for a in args if not a.startswith("--out_dir")] + [f"--out_dir={tmp_path / name}"]


def test_torchrun_two_processes_match_one(tmp_path):
    run_world(1, tiny(tmp_path, "one"), tmp_path)
    torchrun = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            *tiny(tmp_path, "two"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert torchrun.returncode == 0, torchrun.stderr
    assert "global batch 4 x 32 tokens (2 process(es))" in torchrun.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_resume_across_world_sizes(tmp_path):
    run_world(1, tiny(tmp_path, "full"), tmp_path)
    run_world(2, tiny(tmp_path, "a", max_iters=2), tmp_path)  # two processes, then one
    run_world(1, [f"--out_dir={tmp_path / 'a'}", "--init_from=resume", "--max_iters=4"], tmp_path)
    assert_same_run(tmp_path / "full", tmp_path / "a")
    run_world(1, tiny(tmp_path, "b", max_iters=2), tmp_path)  # one process, then two
    run_world(2, [f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--max_iters=4"], tmp_path)
    assert_same_run(tmp_path / "full", tmp_path / "b")


def test_accumulation_that_does_not_split_is_refused(tmp_path):
    results = finish(launch(2, tiny(tmp_path, "x", gradient_accumulation_steps=3), tmp_path))
    for code, _, err in results:
        assert code == 2
        assert "gradient_accumulation_steps=3 does not split over 2 processes" in err


def test_a_dead_rank_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    args = tiny(
        tmp_path,
        "run",
        max_iters=100000,
        lr_decay_iters=0,
        eval_interval=100000,
        checkpoint_interval=2,
        dist_timeout=20,
    )
    procs = launch(2, args, tmp_path)
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    deadline = time.time() + 60
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists()
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    code, _, err = finish(procs[:1], timeout=60)[0]
    procs[1].communicate()
    assert code == 2 and time.time() - start < 45
    assert "lost contact with the other processes" in err and "Traceback" not in err
    _, header = load_checkpoint(ckpt)  # still a good checkpoint
    assert header["iter"] >= 2 and header["iter"] % 2 == 0


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_anywhere(tmp_path):
    run_world(1, tiny(tmp_path, "full"), tmp_path)
    run_world(2, tiny(tmp_path, "sharded", fsdp="true"), tmp_path)
    assert_same_run(tmp_path / "full", tmp_path / "sharded")
    run_world(2, tiny(tmp_path, "half", fsdp="true", max_iters=2), tmp_path)
    run_world(
        1,
        [f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=4", "--fsdp=false"],
        tmp_path,
    )  # the same single-file checkpoint format
    assert_same_run(tmp_path / "full", tmp_path / "half")
    run_world(1, tiny(tmp_path, "plain", max_iters=2), tmp_path)  # and back into FSDP
    run_world(
        2,
        [f"--out_dir={tmp_path / 'plain'}", "--init_from=resume", "--max_iters=4", "--fsdp=true"],
        tmp_path,
    )
    assert_same_run(tmp_path / "full", tmp_path / "plain")


# Counts the bytes this process reads with read()/pread() (the kernel's rchar) while the
# trainer sets up its model and optimizer, after the modules that set-up imports are loaded.
READ_COUNTER = """
import sys
import torch._dynamo, torch.distributed.checkpoint.state_dict, torch.distributed.fsdp
from minigpt2.train import trainer
from minigpt2.cli.train import train_main

def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])

set_up = trainer.Trainer._set_up
def counted(self, *args):
    before = rchar()
    set_up(self, *args)
    print("read during set-up:", rchar() - before, flush=True)
trainer.Trainer._set_up = counted
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_fsdp_resume_reads_only_the_rows_each_rank_holds(tmp_path):
    shape = dict(n_layer=2, n_head=8, n_embd=512, block_size=64, batch_size=2, eval_iters=1)
    run_world(2, tiny(tmp_path, "big", fsdp="true", max_iters=2, **shape), tmp_path)
    path = tmp_path / "big" / "ckpt.safetensors"
    size = path.stat().st_size  # weights and AdamW's two moments: 3 x 6.7M floats
    script = tmp_path / "count_reads.py"
    script.write_text(READ_COUNTER)
    resume = [f"--out_dir={tmp_path / 'big'}", "--init_from=resume", "--max_iters=3"]
    results = finish(launch(2, resume, tmp_path, script))
    reads = []
    for code, out, err in results:
        assert code == 0, err
        reads.append(int(out.split("read during set-up:")[1].split()[0]))
    # Each rank reads its half of every tensor, and a little more: the digests are checked by
    # whole pieces (>= 256 KiB). A whole-checkpoint load would read `size` bytes on each rank.
    assert size > 70e6 and all(r < 0.56 * size for r in reads), (reads, size)
    print(f"bytes read per rank on resume: {reads} of {size}")
    assert sum(reads) > size  # between them, the ranks did read everything


def test_two_processes_match_one_on_records_and_hellaswag(tmp_path):
    from test_evaluate import hellaswag_examples
    from test_records import completion_records, write_jsonl

    data = write_jsonl(tmp_path / "records.jsonl", completion_records())
    hs = write_jsonl(tmp_path / "hs.jsonl", hellaswag_examples(15))  # 15: ranks score 8 and 7
    common = dict(data=data, block_size=48, val_fraction=0.25, max_iters=6, lr_decay_iters=6)
    common["hellaswag"] = str(hs)
    run_world(1, tiny(tmp_path, "one", **common), tmp_path)
    run_world(2, tiny(tmp_path, "two", **common), tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    scored = [
        [(r["hellaswag_acc"], r["hellaswag_acc_norm"]) for r in rows if "hellaswag_acc" in r]
        for rows in (metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    ]
    assert len(scored[0]) == 3 and scored[0] == scored[1]


def test_mfu_divides_the_global_rate_by_every_device(tmp_path, monkeypatch):
    """tokens_per_sec counts the global batch, so MFU's peak is world_size devices' peak."""
    from types import SimpleNamespace

    import minigpt2.train.report as report
    from minigpt2 import GPT, GPTConfig
    from minigpt2.train.config import TrainConfig

    monkeypatch.setattr(report, "peak_flops", lambda device, dtype, tf32: 1e12)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))
    for world in (1, 4):
        trainer = SimpleNamespace(
            dist=SimpleNamespace(world_size=world, is_main=True),
            cfg=TrainConfig(out_dir=str(tmp_path / str(world)), progress=False, max_iters=1),
            model=model, block_size=8, device="cpu", dtype=torch.float32, iter=0,
            tokens_seen=0, global_batch=4, data_note=None,
        )  # fmt: skip
        assert report.Reporter(trainer).peak == 1e12 * world


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """SIGTERM to rank 1 only (a preemption or a kill of one process): both ranks save at the
    same step and exit 143, and the run resumes."""
    import signal
    import time

    args = tiny(tmp_path, "run", max_iters=100000, eval_interval=100000,
                checkpoint_interval=100000, log_interval=1)  # fmt: skip
    procs = launch(2, args, tmp_path)
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (
        metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3
    ):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    for code, _, err in results:
        assert code == 143, err
        assert "Traceback" not in err
    from minigpt2.formats.checkpoint import load_checkpoint

    _, header = load_checkpoint(tmp_path / "run" / "ckpt.safetensors")
    assert header["iter"] >= 3
    run_world(1, [f"--out_dir={tmp_path / 'run'}", "--init_from=resume",
                  f"--max_iters={header['iter'] + 1}"], tmp_path)  # fmt: skip


def test_each_rank_draws_its_own_dropout_and_resumes_its_own_stream(tmp_path):
    """Two ranks with dropout: their generators differ, each is saved, and a resumed run
    equals the uninterrupted one."""
    from minigpt2.formats.checkpoint import load_checkpoint

    common = dict(dropout=0.1, max_iters=4)
    run_world(2, tiny(tmp_path, "full", **common), tmp_path)
    run_world(2, tiny(tmp_path, "a", **{**common, "max_iters": 2}), tmp_path)
    tensors, _ = load_checkpoint(tmp_path / "a" / "ckpt.safetensors")
    assert not torch.equal(tensors["rng.rank0.torch_cpu"], tensors["rng.rank1.torch_cpu"])
    run_world(2, [f"--out_dir={tmp_path / 'a'}", "--init_from=resume", "--max_iters=4"], tmp_path)
    assert_same_run(tmp_path / "full", tmp_path / "a")


def _turns_worker(rank: int, world: int, init: str, log: str) -> None:
    import time

    import torch.distributed as dist

    from minigpt2.train.distributed import DistContext, in_turns

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    def work():
        with open(log, "a") as f:
            f.write(f"{rank} start {time.monotonic()}\n")
        time.sleep(0.3 if rank == 0 else 0.0)  # rank 0 prepares; the others find the cache
        with open(log, "a") as f:
            f.write(f"{rank} end {time.monotonic()}\n")
        return rank

    ctx = DistContext(rank, rank, world)
    assert in_turns(ctx, work, "prepare the data", every=0.1) == rank
    dist.destroy_process_group()


def test_rank_zero_prepares_first_and_the_others_wait_for_it(tmp_path, capfd):
    """Corpus preparation runs on rank 0 before any other rank starts it (one tokenization,
    one .partial folder), then on the others, which find the prepared cache. One waiting rank
    of the machine says so while it waits."""
    import torch.multiprocessing as mp

    log = tmp_path / "log"
    mp.spawn(_turns_worker, args=(3, f"file://{tmp_path / 'init'}", str(log)), nprocs=3)
    said = [line for line in capfd.readouterr().err.splitlines() if "waiting for" in line]
    assert said[0].startswith("rank 1: waiting for rank 0 to prepare the data (0 s so far)")
    assert all(x.startswith("rank 1: waiting for") for x in said)  # one rank speaks
    events = [line.split() for line in log.read_text().splitlines()]
    end0 = next(float(t) for r, what, t in events if r == "0" and what == "end")
    starts = [float(t) for r, what, t in events if r != "0" and what == "start"]
    assert len(starts) == 2 and min(starts) >= end0


def test_sharded_model_from_the_meta_device(tmp_path):
    """One gloo process, in this process: GPT-2's init drawn shard by shard equals GPT(config)
    after the same seed; a model to fine-tune copies in exactly; in bfloat16 FSDP gathers and
    computes in bfloat16 while the sharded weights and their gradients stay float32."""
    import torch.distributed as dist

    from minigpt2.model.config import GPTConfig
    from minigpt2.model.gpt import GPT
    from minigpt2.train.sharding import fill_shards, fill_with_init, rows_of_model, sharded_model

    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)
    init = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        torch.manual_seed(3)
        model = sharded_model(config, torch.device("cpu"), torch.float32)
        fill_with_init(model)
        after_sharded = torch.get_rng_state()
        torch.manual_seed(3)
        reference = GPT(config)
        assert torch.equal(torch.get_rng_state(), after_sharded)  # dropout draws on alike
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.full_tensor(), q), name
        trained = GPT(config)  # other weights, as a model to fine-tune would bring
        model = sharded_model(config, torch.device("cpu"), torch.bfloat16)
        fill_shards(model, rows_of_model(trained))
        x = torch.randint(0, 97, (2, 16))
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        assert torch.allclose(logits.float(), trained(x), atol=0.05)
        logits.float().square().mean().backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        dist.destroy_process_group()
