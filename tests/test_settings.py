"""One G/W decision (settings.decide, with settings.resolve's rule): the Python API, the CLI's `info`
and `serve` choose the same G and W for the same request, on real model files (tiny random GGUFs with
the trained context and the sliding window of each case), and word their errors in their own spelling."""
import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from selfextend_gguf import settings
from selfextend_gguf.gguf_info import ModelInfo

# (n_ctx, trained context L, --grp-attn-w or None, sliding window or None)
CASES = [
    (32, 64, None, None), (64, 64, None, None), (100, 64, None, None), (200, 64, None, None),
    (200, 64, 4, None), (200, 64, 16, None), (300, 64, None, None),
    (100, 64, None, 10), (200, 64, None, 10), (200, 64, 12, 10), (300, 64, 16, 10),
    (3000, 2048, None, None), (4096, 2048, None, None), (8192, 2048, 128, None),
    (6000, 8192, None, None), (12082, 8192, None, None), (16384, 8192, None, None),
    (16384, 8192, 4096, None),  # the case: G=9, not the G=4 the API once picked
    (32768, 8192, None, None), (65536, 8192, 512, None),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_tiny_gguf):
    """{(L, sliding window): path}"""
    folder = tmp_path_factory.mktemp("resolver")
    paths = {}
    for _, n_ctx_train, _, sliding in CASES:
        key = (n_ctx_train, sliding)
        if key not in paths:
            path = folder / f"tiny-{n_ctx_train}-{sliding}.gguf"
            paths[key] = (make_tiny_gguf.write_tiny_gemma3(path, n_ctx_train=n_ctx_train, sliding_window=sliding)
                          if sliding else make_tiny_gguf.write_tiny_llama(path, n_ctx_train=n_ctx_train))
    return paths


def api_choice(path, n_ctx, window):
    from selfextend_gguf import Llama

    llm = Llama(str(path), n_ctx=n_ctx, grp_attn_n="auto", grp_attn_w=window, n_threads=1, verbose=False)
    try:
        return (llm.grp_attn_n, llm.grp_attn_w) if llm.grp_attn_n > 1 else (1, 0)
    finally:
        llm.close()


def info_choice(path, n_ctx, window, capsys):
    from selfextend_gguf.cli import main

    argv = ["info", "--model", str(path), "--ctx", str(n_ctx)] + (["--grp-attn-w", str(window)] if window else [])
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    if f"--ctx {n_ctx:,}: off" in out:
        return (1, 0)
    found = re.search(r"--grp-attn-n (\d+) --grp-attn-w ([\d,]+)", out)
    return int(found[1]), int(found[2].replace(",", ""))


def serve_choice(path, n_ctx, window):
    from selfextend_gguf.serve import add_serve_arguments, server_command

    argv = ["--model", str(path), "--ctx", str(n_ctx)] + (["--grp-attn-w", str(window)] if window else [])
    flags = dict(zip(*[iter(server_command(add_serve_arguments(argparse.ArgumentParser()).parse_args(argv))[1:])] * 2))
    return (int(flags["--grp-attn-n"]), int(flags["--grp-attn-w"])) if "--grp-attn-n" in flags else (1, 0)


@pytest.mark.parametrize("n_ctx,n_ctx_train,window,sliding", CASES)
def test_api_cli_and_server_choose_the_same(models, capsys, n_ctx, n_ctx_train, window, sliding):
    path = models[(n_ctx_train, sliding)]
    expected = settings.resolve("auto", window, n_ctx, n_ctx_train, sliding)
    expected = (expected.group_size, expected.neighbor_window)
    assert api_choice(path, n_ctx, window) == expected
    assert info_choice(path, n_ctx, window, capsys) == expected
    assert serve_choice(path, n_ctx, window) == expected
    group_size, chosen_window = expected
    if n_ctx <= n_ctx_train:
        assert expected == (1, 0)
    else:  # the rule: W + (n_ctx - W) / G within 2/3 of L where any G allows it, and always within the reach
        assert chosen_window == (window or settings.default_window(n_ctx_train, sliding))
        assert settings.max_context(n_ctx_train, settings.SelfExtend(group_size, chosen_window)) >= n_ctx
        if settings.smallest_group_size(n_ctx, n_ctx_train, chosen_window, settings.AUTO_TARGET_FRACTION):
            assert chosen_window + (n_ctx - chosen_window) / group_size <= 2 / 3 * n_ctx_train + 1e-9


def test_pinned_choices():
    assert settings.resolve("auto", 4096, 16384, 8192) == settings.SelfExtend(9, 4096)
    assert settings.resolve("auto", None, 12082, 8192) == settings.SelfExtend(3, 1024)  # the README's main job
    assert settings.resolve("auto", None, 200, 64, 10) == settings.SelfExtend(6, 10)  # 10 + 190/6 <= 42.7


def test_errors_name_the_callers_settings():
    with pytest.raises(settings.BeyondReach, match=r"n_ctx=1000 is beyond what grp_attn_n=2, grp_attn_w=16 reach"):
        settings.resolve(2, 16, 1000, 64)
    with pytest.raises(settings.BeyondReach, match=r"--ctx 1000 is beyond what --grp-attn-n 2, --grp-attn-w 16 reach"):
        settings.resolve(2, 16, 1000, 64, spelling=settings.CLI)
    with pytest.raises(ValueError, match=r"^--grp-attn-w 64 must be smaller than the model's trained context"):
        settings.resolve(4, 64, 100, 64, spelling=settings.CLI)
    # Self-Extend off past the trained context: allowed by the API (it warns), refused by the CLI
    assert settings.resolve(1, None, 100, 64) == settings.SelfExtend()
    with pytest.raises(settings.BeyondReach, match=r"--ctx 100 is longer than the model's trained context"):
        settings.resolve(1, None, 100, 64, spelling=settings.CLI, strict=True)


def test_decide_refuses_a_model_in_the_callers_spelling():
    mamba = ModelInfo(Path("mamba.gguf"), "mamba", n_ctx_train=8192, rope_freq_base=None, rope_scaling_type=None,
                      rope_dimension_count=None, file_type=None, size_bytes=0)
    with pytest.raises(ValueError, match=r"architecture mamba has a recurrent .*\(grp_attn_n=1\)$"):
        settings.decide(mamba, 4, None, 4096)
    with pytest.raises(ValueError, match=r"architecture mamba has a recurrent .*\(--grp-attn-n 1\)$"):
        settings.decide(mamba, "auto", None, 16384, spelling=settings.CLI, strict=True)  # auto turns it on
    assert settings.decide(mamba, "auto", None, 4096) == settings.SelfExtend()  # off: the model runs as it is
    yarn = dataclasses.replace(mamba, path=Path("yarn.gguf"), architecture="llama", rope_scaling_type="yarn")
    with pytest.raises(ValueError, match=r"YaRN RoPE scaling.*\(--grp-attn-n 1\)"):
        settings.decide(yarn, 4, None, 4096, spelling=settings.CLI)
    # the model is refused before any setting is checked against it
    with pytest.raises(ValueError, match=r"^Self-Extend cannot run on mamba.gguf"):
        settings.decide(mamba, 2, 8192, 100000)
