"""The command line against the running stack: ingest a JSONL file, then match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stack_helpers import read_decisions
from twinstream.cli import main
from twinstream.devstack import LocalStack

pytestmark = pytest.mark.stack


def test_ingest_file_then_match(stack: LocalStack, tenant: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"id": "cli-1", "record": {"given_name": "ada", "surname": "lovelace", "postcode": "1815"},
             "metadata": {"source": "crm"}},
            {"id": "cli-2", "record": {"given_name": "ada", "surname": "lovelace", "postcode": "1816"}},
            {"id": "cli-3", "text": ""}]
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    # a token the CLI itself issues, for this tenant only, with the stack's CA
    assert stack.security is not None
    assert main(["token", "issue", "--tenant", tenant, "--scopes", "ingest,match", "--ttl", "10m",
                 "--key-file", str(stack.security.token_key_file)]) == 0
    token = capsys.readouterr().out.strip()
    targets = ["--ingestion", stack.grpc_target("ingestion"), "--matching", stack.grpc_target("matching"),
               "--ca-file", str(stack.security.ca_file), "--token", token]
    assert main([*targets, "ingest", str(data), "--tenant", tenant]) == 2  # one bad line
    out = capsys.readouterr().out
    assert "accepted 2, rejected 1" in out and "#2 cli-3: empty_payload" in out
    read_decisions(stack, ["cli-1", "cli-2"], tenant)
    assert main([*targets, "match", "--tenant", tenant, "--id", "cli-2", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "cli-1" in out and "model twinstream_text:1" in out
    assert main([*targets, "match", "--tenant", tenant, "--id", "cli-1", "--where", "source=crm"]) == 0
    assert "cli-2" not in capsys.readouterr().out.split("\n", 1)[1]
