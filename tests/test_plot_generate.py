"""`python -m infra plot` and `python -m infra generate` on real smoke runs."""

import json
import shutil

import pytest

from infra.errors import UserError
from tests.helpers import cli

SMOKE = "experiments/lm.py:smoke"
QUIET = "--config.sharding.print_table=false"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two smoke runs trained through the CLI (two learning rates), once for this file.

    One after the other: on a 2-core machine two runs of 8 emulated devices at once are slower."""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "lr3e-3", root / "lr1e-3"
    for workdir, extra in ((a, ()), (b, ("--config.optim.lr=1e-3",))):
        p = cli("train", "--config", SMOKE, "--workdir", str(workdir), QUIET, *extra)
        assert p.returncode == 0, p.stderr
    return a, b


def assert_png(path, *, min_width=600):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert width >= min_width and 200 <= height < width  # two panels side by side
    assert image.std() > 0.01  # something was drawn


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_plot_one_and_two_runs(runs, tmp_path):
    a, b = runs
    before = sorted(f.relative_to(a) for f in a.rglob("*"))
    p = cli("plot", str(a), cwd=tmp_path)  # the default: loss.png here, nothing into the run
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "loss.png"
    assert_png(tmp_path / "loss.png")
    assert sorted(f.relative_to(a) for f in a.rglob("*")) == before

    out = tmp_path / "sub" / "both.png"
    p = cli("plot", str(a), str(b), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out)
    assert_png(out)
    assert out.read_bytes() != (tmp_path / "loss.png").read_bytes()


@pytest.mark.slow
def test_generate_through_cli_is_reproducible_with_a_seed(runs):
    from infra import generate

    a, _ = runs
    p = cli("generate", "--workdir", str(a), "--prompt", "def ", "--max_new_tokens", "40",
            "--temperature", "0.8", "--top_k", "40", "--seed", "3")
    assert p.returncode == 0, p.stderr
    text = p.stdout.removesuffix("\n")
    assert text.startswith("def ") and len(text) >= len("def ") + 5, text
    # the same seed on the same 8 devices samples the same text, here in this process too
    assert generate.generate(a, "def ", max_new_tokens=40, temperature=0.8, top_k=40, seed=3) == text


@pytest.mark.slow
def test_greedy_generation_is_deterministic(runs):
    from infra import generate

    a, _ = runs
    kwargs = dict(max_new_tokens=30, temperature=0.0, top_k=0, seed=0)
    first = generate.generate(a, "import ", **kwargs)
    assert first.startswith("import ") and len(first) > len("import ")
    assert generate.generate(a, "import ", **{**kwargs, "seed": 1}) == first  # seed is unused
    # other seeds sample other text; the same seed the same text
    sample = dict(max_new_tokens=30, temperature=1.0, top_k=0)
    s0 = generate.generate(a, "import ", seed=0, **sample)
    assert s0 == generate.generate(a, "import ", seed=0, **sample)
    assert s0 != generate.generate(a, "import ", seed=1, **sample)
    # the buffer is model.max_seq_len tokens: [BOS] + prompt + completion stop when it is full
    length = json.loads((a / "config.json").read_text())["model"]["max_seq_len"]
    prompt = "x" * (length - 4)
    full = generate.generate(a, prompt, max_new_tokens=100, temperature=1.0, top_k=5, seed=0)
    assert full.startswith(prompt) and len(full) <= length - 1  # one char per byte at most
    with pytest.raises(UserError, match="max_seq_len|context"):
        generate.generate(a, "x" * length, max_new_tokens=5, temperature=0.0, top_k=0, seed=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax on bad files
def test_corrupted_latest_checkpoint_falls_back_and_changes_nothing(runs, tmp_path, caplog):
    from infra import generate

    a, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    for f in (copy / "checkpoints" / "30" / "state" / "d").iterdir():  # flip a byte in each
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(raw)
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    kwargs = dict(max_new_tokens=10, temperature=0.0, top_k=0, seed=0)
    with caplog.at_level("WARNING", logger="infra.generate"):
        text = generate.generate(copy, "def ", **kwargs)
    assert "checkpoint step 30" in caplog.text and "using step 20" in caplog.text
    assert text.startswith("def ")
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before  # read-only


@pytest.mark.slow
def test_errors_are_one_line_with_exit_2(runs, tmp_path):
    a, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("plot", str(a), str(empty)), "metrics.jsonl", str(empty))
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(a / "config.json", untrained / "config.json")
    assert_one_line_error(cli("generate", "--workdir", str(untrained), "--prompt", "x"),
                          "no checkpoint", str(untrained))


def test_library_errors(tmp_path):
    from infra import generate, plot

    missing = tmp_path / "missing"
    with pytest.raises(UserError, match="does not exist"):
        plot.plot_runs([missing])
    with pytest.raises(UserError, match="does not exist"):
        generate.generate(missing, "x", max_new_tokens=1, temperature=0, top_k=0, seed=0)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "train/loss": 2.0}\n')
    with pytest.raises(UserError, match="config.json"):
        plot.plot_runs([tmp_path])
    (tmp_path / "config.json").write_text(json.dumps({"task": "mnist", "train": {"batch_size": 4}}))
    with pytest.raises(UserError, match="language-model"):
        generate.generate(tmp_path, "x", max_new_tokens=1, temperature=0, top_k=0, seed=0)
    with pytest.raises(UserError, match="no checkpoint"):
        generate.generate(_copy_smoke_config(tmp_path / "fresh"), "x", max_new_tokens=1,
                          temperature=0, top_k=0, seed=0)


def test_plot_units_from_config(tmp_path):
    """Tokens for the LM task (batch × seq_len per step), examples otherwise; plots either."""
    from infra import plot

    assert plot.units_per_step({"task": "lm", "train": {"batch_size": 16},
                                "data": {"seq_len": 64}}) == (1024, "tokens")
    assert plot.units_per_step({"task": "mnist", "train": {"batch_size": 16}}) == (16, "examples")
    records = [{"step": 0, "eval/loss": 3.0}, {"step": 5, "train/loss": 2.5},
               {"step": 10, "train/loss": None}, {"step": 10, "train/loss": 2.0, "eval/loss": 2.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.json").write_text(json.dumps({"task": "mnist", "train": {"batch_size": 4}}))
    out = plot.plot_runs([tmp_path], tmp_path / "x.png")
    assert_png(out)


def _copy_smoke_config(workdir):
    """A workdir holding a resolved smoke config and no checkpoint (no training needed)."""
    from infra import config

    workdir.mkdir()
    config.save(config.load(SMOKE), workdir)
    return workdir


@pytest.mark.slow
def test_a_second_generate_loads_what_the_first_compiled(runs, tmp_path):
    """JAX's persistent compilation cache (`--compile_cache` / INFRA_COMPILE_CACHE): the first
    `generate` compiles and writes every program, the second (the cache moved to another
    directory) loads them all and compiles none, and says so."""
    a, _ = runs
    cache = tmp_path / "cache"
    args = ("generate", "--workdir", str(a), "--prompt", "def ", "--max_new_tokens", "8",
            "--temperature", "0", "--json")
    first = cli("--compile_cache", str(cache), *args)
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    # every program is written (a program built twice in one process, by two jit wrappers,
    # may load its own first copy: a hit)
    assert one["compile_cache"]["writes"] > 0, one
    entries = sorted(p.name for p in cache.iterdir())
    moved = tmp_path / "moved"  # a cache copied elsewhere (a container image) still serves
    cache.rename(moved)
    second = cli(*args, env={"INFRA_COMPILE_CACHE": str(moved)})
    assert second.returncode == 0, second.stderr
    two = json.loads(second.stdout)
    assert two["compile_cache"] == {"hits": sum(one["compile_cache"].values()), "writes": 0}, two
    assert two["token_ids"] == one["token_ids"]  # the same programs: the same tokens
    assert sorted(p.name for p in moved.iterdir()) == entries
    print(f"first token: {one['first_token_s']:.2f} s compiling, {two['first_token_s']:.2f} s "
          f"from the cache")


def test_the_compile_cache_can_be_moved_or_turned_off_and_a_bad_one_is_a_warning(
        tmp_path, monkeypatch, caplog):
    from infra import compile_cache
    from infra.cli import _parser

    # the flag before the command or after it
    for argv in (["--compile_cache", "d", "generate", "--workdir", "w"],
                 ["generate", "--workdir", "w", "--compile_cache", "d"],
                 ["train", "--config", "c", "--workdir", "w", "--compile_cache", "d"]):
        assert _parser().parse_args(argv).compile_cache == "d"
    assert _parser().parse_args(["serve", "--workdir", "w"]).compile_cache is None
    monkeypatch.setenv("INFRA_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache.resolve() == tmp_path / "env"
    assert compile_cache.resolve(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag wins
    assert compile_cache.resolve("off") is None and compile_cache.resolve("OFF") is None
    monkeypatch.delenv("INFRA_COMPILE_CACHE")
    monkeypatch.setenv("INFRA_CACHE_DIR", str(tmp_path / "cache"))
    assert compile_cache.resolve() == tmp_path / "cache" / "jax"
    blocked = tmp_path / "file"
    blocked.write_text("")
    with caplog.at_level("WARNING"):
        assert compile_cache.enable(str(blocked / "cache")) is None  # nothing configured
    assert "not writable" in caplog.text
