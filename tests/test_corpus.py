"""Our server against the shared extraction corpus (tests/corpus/), through a real socket.

The reference peer is checked against the same corpus in test_reference_peer.py.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import StartServer
from corpus_check import ARCHIVES, archive_bytes, differences


@pytest.mark.parametrize("archive", ARCHIVES)
async def test_our_answers_match_the_corpus(start_server: StartServer, inflater: str, archive: str) -> None:
    server = await start_server(inflater=inflater)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, verify=False) as client:
        response = await client.post("/api/v1/upload", content=archive_bytes(archive))
    assert response.status_code == 200, response.text
    assert differences(archive, response.json()) == []
