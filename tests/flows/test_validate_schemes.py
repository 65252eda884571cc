"""`tryon validate` reports image references a run would refuse to fetch, before any run.

Only local paths, file://, http(s)://, data: and s3:// (and memory://) are read; other fsspec
protocols and chained fsspec URLs would fetch past the address guard, so the row is invalid and
the reason names the scheme.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import flows.cli

HEADER = "id,person_image,garment_image,category"


def validate(path: Path) -> tuple[int, str]:
    # The local images exist: validate checks that too, as a run does.
    for name in ("p.jpg", "g.jpg"):
        (path.parent / name).write_bytes(b"")
    result = CliRunner().invoke(flows.cli.app, ["validate", str(path)])
    return result.exit_code, result.output


def test_validate_names_each_refused_scheme(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "\n".join(
            [
                HEADER,
                "ok,p.jpg,https://cdn.example/g.jpg,dresses",
                "ftp-row,ftp://127.0.0.1:2121/p.jpg,g.jpg,dresses",
                "chain-row,p.jpg,SimpleCache::http://127.0.0.1:8000/g.jpg,dresses",
                "zip-row,zip://p.jpg::http://169.254.169.254/a.zip,g.jpg,dresses",
                "gs-row,gs://bucket/p.jpg,g.jpg,dresses",
            ]
        )
        + "\n"
    )
    code, output = validate(manifest)
    assert code == flows.cli.EXIT_ROWS == 1
    assert "5 rows: 1 valid, 4 invalid" in output
    assert "URI scheme 'ftp' is not allowed in column 'person_image'" in output
    assert "chained fsspec URLs ('simplecache::...') are not allowed in column 'garment_image'" in (
        output
    )
    assert "chained fsspec URLs ('zip::...') are not allowed in column 'person_image'" in output
    assert "URI scheme 'gs' is not allowed in column 'person_image'" in output
    assert "169.254.169.254" not in output  # the reason names the scheme, not the target


def test_validate_accepts_the_allowed_schemes(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "\n".join(
            [
                HEADER,
                f"local,p.jpg,{tmp_path}/g.jpg,dresses",
                "url,HTTPS://cdn.example/p.jpg,http://[2001:db8::1]/g.jpg,dresses",
                f"files,file://{tmp_path}/p.jpg,s3://bucket/g.jpg,dresses",
                'inline,"data:image/png;base64,AAAA",memory://b/g.jpg,dresses',
            ]
        )
        + "\n"
    )
    code, output = validate(manifest)
    assert code == flows.cli.EXIT_OK == 0, output
    assert "4 rows: 4 valid, 0 invalid" in output
