"""The ``ndcompile`` command on the models users bring: transformers, keyword and token inputs.

Tiny BERT and GPT-2 models are built from configs by a factory file written to a
temporary folder; every command runs in-process through ``main()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ndcompile
from ndcompile.cli.examples import (
    ForwardSignature,
    check_example_names,
    example_high,
    load_example_file,
    random_example,
)
from ndcompile.cli.loading import UsageError
from ndcompile.cli.main import EXIT_FAILED, EXIT_USAGE, main
from ndcompile.frontend.inputs import ExampleInputs

transformers = pytest.importorskip("transformers")

VOCAB = 96

FACTORIES = f'''
import torch
import transformers


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        vocab_size={VOCAB}, max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=1, n_head=2, vocab_size={VOCAB}, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


class Branchy(torch.nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def branchy():
    torch.manual_seed(0)
    return Branchy()
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The factory file."""
    path = tmp_path_factory.mktemp("models") / "hf_factories.py"
    path.write_text(FACTORIES)
    return path


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class _Config:
    vocab_size = 1000


class _WithConfig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()

    def forward(self, input_ids: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        return input_ids


# ------------------------------------------------------------------ random inputs
@pytest.mark.parametrize(
    ("dtype", "high", "lo", "hi"),
    [("long", 7, 0, 6), ("int32", 3, 0, 2), ("bool", 50, 0, 1), ("uint8", 256, 0, 255)],
)
def test_integer_inputs_lie_in_range(dtype: str, high: int, lo: int, hi: int) -> None:
    example = random_example(["64,64"], [dtype], model_dtype=torch.float32, high=high)
    (x,) = example.args
    assert x.dtype == ndcompile.cli.examples.INPUT_DTYPES[dtype]
    assert int(x.min()) >= lo and int(x.max()) <= hi
    assert len(torch.unique(x)) > 1  # random, not a constant


def test_keyword_specs_dtypes_and_seed() -> None:
    specs = ["3,5", "mask=3,5"]
    a = random_example(specs, ["long", "bool"], model_dtype=torch.float64, high=10, seed=1)
    b = random_example(specs, ["long", "bool"], model_dtype=torch.float64, high=10, seed=1)
    assert list(a.kwargs) == ["mask"] and a.kwargs["mask"].dtype == torch.bool
    assert torch.equal(a.args[0], b.args[0]) and torch.equal(a.kwargs["mask"], b.kwargs["mask"])
    floats = random_example(["4"], None, model_dtype=torch.float64, high=2)
    assert floats.args[0].dtype == torch.float64


@pytest.mark.parametrize(
    ("specs", "dtypes", "high", "message"),
    [
        (["x=2,3", "2,3"], None, 2, "must come before NAME="),
        (["x=2", "x=3"], None, 2, "names an input twice"),
        (["2", "3", "4"], ["long", "bool"], 2, "one --example-dtype for all inputs"),
        (["2"], ["complex"], 2, "valid dtypes are: float32"),
        (["2"], ["int8"], 1000, "does not fit int8"),
        (["1x=2"], None, 2, "is not an argument name"),
    ],
)
def test_random_example_rejects(
    specs: list[str], dtypes: list[str] | None, high: int, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        random_example(specs, dtypes, model_dtype=torch.float32, high=high)


def test_token_range_defaults_to_the_vocabulary() -> None:
    assert example_high(_WithConfig(), None) == 1000
    assert example_high(_WithConfig(), 5) == 5
    assert example_high(nn.Linear(2, 2), None) == 2


def test_names_are_checked_against_forward() -> None:
    model = _WithConfig()
    sig = ForwardSignature.of(model)
    assert sig.positional == ("input_ids",) and "mask" in sig.keywords and not sig.var_keyword
    check_example_names(model, ExampleInputs((), {"input_ids": torch.ones(1), "mask": None}), "t")
    with pytest.raises(UsageError, match="takes no input named 'ids'; it takes input_ids, mask"):
        check_example_names(model, ExampleInputs((), {"ids": torch.ones(1)}), "t")
    with pytest.raises(UsageError, match="gives 2 positional inputs"):
        check_example_names(model, ExampleInputs((torch.ones(1), torch.ones(1))), "t")
    with pytest.raises(UsageError, match="both by position and by name"):
        check_example_names(model, ExampleInputs((torch.ones(1),), {"input_ids": 1}), "t")


# ------------------------------------------------------------------ --example FILE
def test_example_files_of_every_form(tmp_path: Path) -> None:
    model = _WithConfig().double()
    ids, mask = _tokens(2, 4), torch.randn(2, 4)
    forms = {
        "named.pt": {"input_ids": ids, "mask": mask},
        "tensor.pt": ids,
        "list.pt": [ids],
        "both.pt": ([ids], {"mask": mask}),
    }
    for name, data in forms.items():
        torch.save(data, tmp_path / name)
    save_file({"input_ids": ids, "mask": mask}, tmp_path / "named.safetensors")
    for name in ("named.pt", "named.safetensors"):
        got = load_example_file(str(tmp_path / name), model, torch.float64)
        assert got.args == () and torch.equal(got.kwargs["input_ids"], ids)
        assert got.kwargs["mask"].dtype == torch.float64  # floats follow the model dtype
    for name in ("tensor.pt", "list.pt"):
        got = load_example_file(str(tmp_path / name), model, torch.float64)
        assert len(got.args) == 1 and torch.equal(got.args[0], ids) and not got.kwargs
    got = load_example_file(str(tmp_path / "both.pt"), model, torch.float64)
    assert torch.equal(got.args[0], ids) and list(got.kwargs) == ["mask"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ({"input_ids": [1, 2]}, "holds a dict holding non-tensor values"),
        ([], "holds a list (empty)"),
        ("text", "holds a str"),
        ({"token_ids": torch.ones(2, 3, dtype=torch.long)}, "takes no input named 'token_ids'"),
    ],
)
def test_bad_example_files(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "inputs.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_example_file(str(path), _WithConfig(), torch.float32)


# ------------------------------------------------------------------ transformers models
def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_lists_every_linear_of_an_untraceable_bert(
    models: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = f"{models}:bert"
    code, out, err = _run(
        capsys, "inspect", spec, "--example-shape", "2,16", "--example-dtype", "long",
        "--exclude", "pooler.*", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    from ndcompile.cli.loading import build_model

    linears = [n for n, m in build_model(spec).named_modules() if isinstance(m, nn.Linear)]
    rows = {r["name"]: r for r in data["layers"]}
    assert sorted(rows) == sorted(linears)
    assert any("not traceable with torch.fx" in n for n in data["notes"])
    assert rows["pooler.dense"]["action"] == "skip" and "exclude" in rows["pooler.dense"]["reason"]
    assert all(r["action"] == "convert" for n, r in rows.items() if n != "pooler.dense")
    # the attention output merges the heads: its input modes come from that reshape
    assert rows["encoder.layer.0.attention.output.dense"]["mode_source"] == "graph"


def test_inspect_gpt2_conv1d_and_tied_head_match_convert(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ids = _tokens(2, 12)
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "in.pt")
    common = [f"{models}:gpt2", "--example", str(tmp_path / "in.pt"), "--mode", "fresh", "--json"]
    code, out, err = _run(capsys, "inspect", *common)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["layers"]}
    assert rows["transformer.h.0.attn.c_attn"]["kind"] == "Conv1D"
    code, out, err = _run(capsys, "convert", *common, "--state-dict-out", str(tmp_path / "w.pt"))
    assert code == 0, err
    report = json.loads(out)["report"]
    for layer in report["layers"]:
        row = rows[layer["name"]]
        assert (row["action"] == "skip") == (layer["status"] == "skipped"), layer["name"]
        assert row["reason"] == layer["reason"]


def test_convert_gpt2_from_named_inputs_to_pt2_and_safetensors(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ids = _tokens(2, 12)
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "in.pt")
    out_pt2, saved = tmp_path / "g.pt2", tmp_path / "g.safetensors"
    code, out, err = _run(
        capsys, "convert", f"{models}:gpt2", "--example", str(tmp_path / "in.pt"),
        "--mode", "fresh", "-o", str(out_pt2), "--save", str(saved),
    )  # fmt: skip
    assert code == 0, err
    assert "exported with use_cache=False fixed" in out
    assert "verify: exported program matches the converted module" in out
    assert f"wrote {out_pt2}" in out and f"wrote {saved}" in out
    from ndcompile.cli.loading import build_model

    restored = ndcompile.load(saved, build_model(f"{models}:gpt2")).eval()
    assert type(restored.transformer.h[0].mlp.c_fc).__name__ == "NdLinear"
    program = torch.export.load(out_pt2)
    other = _tokens(5, 12, seed=3)  # another batch size: the batch dim is dynamic
    feeds = {"input_ids": other, "attention_mask": torch.ones_like(other)}
    with torch.no_grad():
        want = restored(**feeds, use_cache=False).logits
        got = program.module()(**feeds).logits
    torch.testing.assert_close(got, want)


def test_convert_bert_from_token_shape_writes_state_dict(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights, report = tmp_path / "w.safetensors", tmp_path / "r.json"
    code, out, err = _run(
        capsys, "convert", f"{models}:bert", "--example-shape", "input_ids=2,16",
        "--example-dtype", "long", "--mode", "factorize", "--rank", "2",
        "--state-dict-out", str(weights), "--report", str(report),
    )  # fmt: skip
    assert code == 0, err
    assert "(example input input_ids=(2, 16) int64)" in out
    data = json.loads(report.read_text())
    assert data["output"] == "module" and data["output_rel_error"] is not None
    from safetensors.torch import load_file

    state = load_file(weights)
    assert "encoder.layer.0.attention.self.query.factors.0" in state
    assert sum(v.numel() for v in state.values()) == data["params_after"]


def test_convert_weights_on_disk_equals_converting_the_loaded_model(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ndcompile.cli.loading import build_model

    ckpt = tmp_path / "gpt2.pt"  # lm_head.weight is tied: torch.save keeps both names
    torch.save(build_model(f"{models}:gpt2").state_dict(), ckpt)
    common = [
        "convert", f"{models}:gpt2", "--state-dict", str(ckpt), "--example-shape", "2,12",
        "--example-dtype", "long", "--mode", "factorize", "--rank", "2",
    ]  # fmt: skip
    outs = {}
    for flags in ([], ["--weights-on-disk"]):
        outs[bool(flags)] = tmp_path / f"w{len(flags)}.safetensors"
        code, out, err = _run(capsys, *common, *flags, "--state-dict-out", str(outs[bool(flags)]))
        assert code == 0, err
    assert "not compared with the original" in out and "weights read from gpt2" in out
    from safetensors.torch import load_file

    loaded, on_disk = load_file(outs[False]), load_file(outs[True])
    assert loaded.keys() == on_disk.keys()
    assert all(torch.equal(loaded[k], on_disk[k]) for k in loaded)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "reads the weights from --state-dict"),
        (["--state-dict", "w.safetensors", "--distill", "d.pt"], "--distill runs the original"),
    ],
)
def test_weights_on_disk_usage_errors(
    models: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    code, _, err = _run(
        capsys, "convert", f"{models}:gpt2", "--weights-on-disk", "--example-shape", "2,12",
        "--example-dtype", "long", "--mode", "fresh", "--save", "x.safetensors", *extra,
    )  # fmt: skip
    assert code == EXIT_USAGE and message in err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--example-shape", "2,16"], EXIT_USAGE, "add --example-dtype long"),
        (["--example-shape", "tokens=2,16", "--example-dtype", "long"], EXIT_USAGE,
         "'tokens' is not a named input of BertModel.forward; it takes input_ids, attention_mask"),
        (["--example", "missing.pt"], EXIT_USAGE, "--example file 'missing.pt' does not exist"),
        (["--example", "x.pt", "--example-shape", "2,16"], EXIT_USAGE,
         "does not combine with --example-shape"),
        ([], EXIT_USAGE, "needs --example-shape D0,D1,.. or --example FILE"),
        (["--example-shape", "2,16", "--example-dtype", "long", "--example-high", "500"],
         EXIT_USAGE, "IndexError: index out of range"),
    ],
)  # fmt: skip
def test_bad_token_inputs(
    models: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    argv: list[str],
    code: int,
    message: str,
) -> None:
    out = tmp_path / "w.pt"
    got, _, err = _run(capsys, "convert", f"{models}:bert", *argv, "--mode", "fresh",
                       "--state-dict-out", str(out))  # fmt: skip
    assert got == code
    assert err.count("\n") == 1 and err.startswith("ndcompile: error: ") and message in err, err
    assert not out.exists()


def test_export_failure_says_why_and_names_the_other_outputs(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "b.pt2"
    code, _, err = _run(
        capsys, "convert", f"{models}:branchy", "--example-shape", "4,64",
        "--mode", "fresh", "-o", str(out),
    )  # fmt: skip
    assert code == EXIT_FAILED
    assert "torch.export failed on the converted model" in err
    assert "--state-dict-out or --save FILE.safetensors" in err
    assert list(tmp_path.iterdir()) == []
