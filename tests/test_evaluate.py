"""Measuring a model: perplexity against Hugging Face's sliding-window loop, HellaSwag against a
plain transformers computation, the lm-eval adapter against lm-eval's own hf model, the eval
command line and HellaSwag during training."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import in_process, write_wide_byte_checkpoint

from minigpt2 import GPT, MiniGPT2Error
from minigpt2.data.tokenizer import ByteTokenizer
from minigpt2.evaluate.scoring import hellaswag, perplexity, read_hellaswag

BYTE = ByteTokenizer()
WORDS = "the a man woman dog runs jumps over under table kitchen then slowly quickly".split()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "wide"  # end-of-text (256) ends lm-eval generations
    return write_wide_byte_checkpoint(path, 64, bos_token_id=256, eos_token_id=256)


def guide_perplexity(hf, ids: torch.Tensor, stride: int, count_scored: bool) -> float:
    """Hugging Face's "Perplexity of fixed-length models" loop. Its token count subtracts one
    per window for the label shift, which is right for the first window only: later windows
    score all their targets. count_scored=True counts the targets the model actually scored."""
    max_length, seq_len = hf.config.n_positions, ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = (target_ids != -100).sum().item() - target_ids.size(0)
        if count_scored:
            n = (target_ids[:, 1:] != -100).sum().item()
        nll_sum, n_tokens, prev_end_loc = nll_sum + loss * n, n_tokens + n, end_loc
        if end_loc == seq_len:
            break
    return (nll_sum / n_tokens).item()


def test_perplexity_equals_the_sliding_window_guide(hf_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = GPT.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, 257, (1, 203), generator=torch.Generator().manual_seed(0))
    for stride in (32, 23):  # 203 tokens: a multiple of neither
        got = perplexity(ours, ids[0].numpy(), stride)
        assert got["nll"] == pytest.approx(guide_perplexity(hf, ids, stride, True), rel=1e-5)
        assert got["tokens"] == 202  # every token but the first, once
    # windows that do not overlap: the guide's count is right, and so is its figure
    got = perplexity(ours, ids[0].numpy(), 64)
    assert got["nll"] == pytest.approx(guide_perplexity(hf, ids, 64, False), rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(got["nll"]).exp().item(), rel=1e-6)


def hellaswag_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"ctx": words(2, 5), "endings": [words(1, 3) for _ in range(4)], "label": rng.randint(0, 3)}
        for _ in range(n)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hellaswag_equals_a_plain_transformers_computation(hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    examples = hellaswag_examples(40)
    path = write_jsonl(tmp_path / "hs.jsonl", examples)
    got = hellaswag(GPT.from_pretrained(hf_dir).eval(), BYTE, read_hellaswag(str(path)), 3)
    acc = acc_norm = differ = 0
    for ex in examples:  # each candidate alone: context + " " + ending, loss on the ending
        ctx, sums, means = list(ex["ctx"].encode()), [], []
        for ending in ex["endings"]:
            ids = torch.tensor([ctx + list((" " + ending).encode())])
            with torch.no_grad():
                losses = F.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:], reduction="none")
            sums.append(losses[len(ctx) - 1 :].sum().item())
            means.append(losses[len(ctx) - 1 :].mean().item())
        pick, pick_norm = min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)
        acc, acc_norm = acc + (pick == ex["label"]), acc_norm + (pick_norm == ex["label"])
        differ += pick != pick_norm
    assert got == {"examples": 40, "acc": acc / 40, "acc_norm": acc_norm / 40}
    assert 0 < got["acc"] < 1 and differ >= 5  # the two rules disagree often: both are tested


def byte_level_hf_tokenizer():
    """transformers' view of this project's byte tokenizer: byte b is id b, end-of-text 256."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}  # GPT-2's printable bytes
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in keep else next(extra)) for b in range(256)}
    vocab = {c: b for b, c in chars.items()} | {"<|endoftext|>": 256}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    eot = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eot, bos_token=eot)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """Three lm-eval tasks over a local JSONL file: multiple choice, rolling, generation."""
    d = tmp_path_factory.mktemp("tasks")
    docs = [
        {
            "question": f"What is {i} plus {i % 3}?" + (" Think it over." * 6 if i == 5 else ""),
            "choices": [f" {i + i % 3}", f" {i + 1}", " many", " zero"],
            "label": i % 4,
            "answer": str(i + i % 3),
            "text": f"Line {i}: the cat sat on the mat {i} times." * (4 if i % 2 else 1),
        }
        for i in range(10)
    ]
    data = write_jsonl(d / "docs.jsonl", docs)
    head = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    )
    specs = {
        "mini_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "mini_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: bits_per_byte\n",
        "mini_gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  do_sample: false\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, body in specs.items():
        (d / f"{name}.yaml").write_text(f"task: {name}\n{head}{body}")
    return d


def test_lm_eval_adapter_equals_lm_evals_hf_model(hf_dir, local_tasks, monkeypatch):
    pytest.importorskip("accelerate")
    lm_eval = pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minigpt2.evaluate.harness import MiniGPT2LM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ref = HFLM(pretrained=hf, tokenizer=byte_level_hf_tokenizer(), batch_size=4, device="cpu")
    ours = MiniGPT2LM(GPT.from_pretrained(str(hf_dir)), tokenizer="byte", batch_size=3)
    pairs = [("The cat", " sat"), ("The cat ", "sat down"), ("", "Hello"), ("x" * 70, " end")]
    pairs += [("The cat sat on the mat", " " + "very " * 10)]  # 73 > 65: context cut on the left
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    scored = zip(ref.loglikelihood(requests), ours.loglikelihood(requests), strict=True)
    for (a, ga), (b, gb) in scored:
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    tasks = ["mini_choice", "mini_rolling", "mini_gen"]
    manager = TaskManager(include_path=str(local_tasks))
    runs = [
        lm_eval.simple_evaluate(model=m, tasks=tasks, task_manager=manager, log_samples=True)
        for m in (ref, ours)
    ]
    for task in tasks:
        want, got = (r["results"][task] for r in runs)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-4), (task, key)
    texts = [[s["resps"] for s in r["samples"]["mini_gen"]] for r in runs]
    assert texts[0] == texts[1]  # greedy generations, character for character
    rolled = [[s["resps"][0][0] for s in r["samples"]["mini_rolling"]] for r in runs]
    assert rolled[0] == pytest.approx(rolled[1], abs=1e-3)  # includes texts longer than 64


def run_module(*args, cwd, env=None):
    """python -m minigpt2 ARGS: in this process, or in a new one where env sets variables
    that libraries read when imported (the Hub's offline switches, PYTHONPATH)."""
    if env is None:
        return in_process(["-m", "minigpt2", *args], cwd)
    return subprocess.run(
        [sys.executable, "-m", "minigpt2", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_eval_command_json_and_table(hf_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    common = ["--model", str(hf_dir), "--tokenizer", "byte", "--data-cache", str(tmp_path / "c")]
    ppl = run_module(
        "eval",
        *common,
        "--task",
        "perplexity",
        "--data",
        str(text),
        "--json",
        "--stride",
        "16",
        cwd=tmp_path,
    )
    assert ppl.returncode == 0, ppl.stderr
    got = json.loads(ppl.stdout)
    tokens = torch.tensor(list(text.read_bytes()) + [256])  # the document ends with end-of-text
    want = perplexity(GPT.from_pretrained(hf_dir).eval(), tokens.numpy(), 16)
    assert got["tokens"] == want["tokens"] == len(tokens) - 1
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(want["nll_sum"] / 0.6931471805599453 / 540)
    hs = write_jsonl(tmp_path / "hs.jsonl", hellaswag_examples(12))
    table = run_module(
        "eval", *common, "--task", "hellaswag", "--data", str(hs), "--limit", "10", cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr
    assert "examples         10" in table.stdout and "acc_norm" in table.stdout


@pytest.mark.parametrize(
    "args, content, message",
    [
        (
            ["--task", "hellaswag", "--data", "nope.jsonl"],
            None,
            "HellaSwag file nope.jsonl not found",
        ),
        (
            ["--task", "hellaswag"],
            '{"ctx": "a", "endings": ["b"], "label": 0}\n{"ctx":\n',
            "line 2",
        ),
        (
            ["--task", "hellaswag"],
            '{"ctx": "a", "endings": ["b", "c"], "label": 2}\n',
            "label 2 is out of range",
        ),
        (["--task", "hellaswag"], '{"ctx": "a", "label": 0}\n', "endings must be"),
        (["--task", "perplexity", "--stride", "0"], "some text here", "stride=0 must be between 1"),
        (["--task", "perplexity", "--stride", "65"], "some text here", "stride=65 must be between"),
        (["--task", "perplexity", "--split", "val"], "ab", "perplexity needs at least 2"),
        (["--task", "rouge"], None, "unknown task 'rouge'; tasks: perplexity, hellaswag"),
        (["--task", "hellaswag", "--limit", "0"], None, "--limit=0 must be at least 1"),
        (["--task", "hellaswag"], None, "cannot read dataset 'hf:Rowan/hellaswag'"),
    ],
)
def test_eval_command_bad_input(hf_dir, tmp_path, args, content, message):
    if content is not None:
        name = "data.jsonl" if args[1] == "hellaswag" else "data.txt"
        (tmp_path / name).write_text(content)
        args = [*args, "--data", name] if "--data" not in args else args
    common = ["--model", str(hf_dir), "--tokenizer", "byte", "--data-cache", str(tmp_path / "c")]
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    hub = "--data" not in args  # HellaSwag from the Hub: offline, in a process of its own
    result = run_module("eval", *common, *args, cwd=tmp_path, env=offline if hub else None)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_lm_eval_command_runs_a_local_task(hf_dir, local_tasks, tmp_path):
    pytest.importorskip("lm_eval")
    result = run_module(
        "lm-eval",
        "--model_args",
        f"pretrained={hf_dir},tokenizer=byte",
        "--tasks",
        "mini_choice",
        "--include_path",
        str(local_tasks),
        "--batch_size",
        "4",
        cwd=tmp_path,
        env={"HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mini_choice" in result.stdout and "acc_norm" in result.stdout
    refused = run_module("lm-eval", "--model", "hf", "--tasks", "x", cwd=tmp_path)
    assert refused.returncode == 2 and "the model is minigpt2" in refused.stderr


def test_without_lm_eval_the_command_says_what_to_install(hf_dir, tmp_path):
    fake = tmp_path / "fake"
    (fake / "lm_eval").mkdir(parents=True)
    (fake / "lm_eval" / "__init__.py").write_text("raise ImportError('not installed here')\n")
    result = run_module(
        "lm-eval",
        "--model_args",
        f"pretrained={hf_dir}",
        "--tasks",
        "x",
        cwd=tmp_path,
        env={"PYTHONPATH": str(fake)},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        'error: lm-eval is not installed; pip install -e ".[eval]" (or pip install lm-eval)'
    )


def test_hellaswag_during_training(tmp_path):
    from test_train import settings

    from minigpt2.cli.train import train_main
    from minigpt2.formats.loading import load_any

    path = write_jsonl(tmp_path / "hs.jsonl", hellaswag_examples(30, seed=3))
    args = settings(tmp_path, hellaswag=str(path), hellaswag_examples=25, dropout=0.0)
    assert train_main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "hellaswag_acc_norm" in r]
    assert [r["iter"] for r in scored] == [3, 6] and all(r["eval_seconds"] > 0 for r in scored)
    model, _ = load_any(str(tmp_path / "out"), "latest")
    final = hellaswag(model.eval(), BYTE, read_hellaswag(str(path), 25))
    assert scored[-1]["hellaswag_acc"] == final["acc"]
    assert scored[-1]["hellaswag_acc_norm"] == final["acc_norm"]
    with pytest.raises(MiniGPT2Error, match="label 7 is out of range"):
        write_jsonl(path, [{"ctx": "a", "endings": ["b"], "label": 7}])
        train_main([*args, "--overwrite=true"])
