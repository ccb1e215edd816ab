"""Hostile image input, without a server: decompression bombs, formats outside the allow-list,
base64 as `base64 FILE` prints it, huge JSON numbers (serve/http.py, runtime/pixels.py)."""

from __future__ import annotations

import base64
import io
from http import HTTPStatus

import pytest
from PIL import Image

from ferry.errors import DataError
from runtime import pixels
from serve.body import RequestError as ImageRequestError
from serve.http import decode, parse_json
from tests import tiny
from tests.serve.images import EPS, png_claiming

PROCESSOR = pixels.processor_dict(8, [0.5] * 3, [0.5] * 3)


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (6, 5), 120).save(buf, format=fmt)
    return buf.getvalue()


# --- decompression bombs: PIL's DecompressionBombError is not an OSError -----------------------------
def test_a_decompression_bomb_is_413_even_when_pil_refuses_it_in_open():
    bomb = png_claiming(20_000, 20_000)  # 400 M pixels: more than twice PIL's limit, so Image.open itself raises
    with pytest.raises(ImageRequestError) as e:
        decode(bomb, "images[0]", PROCESSOR, max_pixels=10_000)
    assert e.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert "images[0]" in str(e.value) and "pixels" in str(e.value)
    # the server's limit above PIL's own: PIL's refusal is still a 413, not a 500
    with pytest.raises(ImageRequestError) as e:
        decode(bomb, "images[0]", PROCESSOR, max_pixels=10**12)
    assert e.value.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE


def test_open_image_names_a_bomb_as_a_data_error():
    with pytest.raises(DataError, match="pixels"):
        pixels.open_image(png_claiming(20_000, 20_000), "up.png", max_pixels=10**12)


# --- formats: an explicit allow-list, so EPS never reaches Ghostscript ---------------------------------
@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("WEBP", "RGB"),
                                       ("TIFF", "RGB"), ("PPM", "RGB"), ("PPM", "L")])
def test_the_allowed_formats_open(fmt, mode):
    img = pixels.open_image(encoded(fmt, mode), f"x.{fmt.lower()}")
    assert img.mode == "RGB" and img.size == (6, 5)


def test_eps_is_refused_before_ghostscript_runs(monkeypatch):
    from PIL import EpsImagePlugin

    calls = []

    def ghostscript(*a, **k):
        calls.append(a)
        raise OSError("Ghostscript would have run here")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    with pytest.raises(DataError, match="PNG, JPEG") as e:
        pixels.open_image(EPS, "doc.eps")
    assert "doc.eps" in str(e.value)
    with pytest.raises(ImageRequestError) as e:
        decode(EPS, "images[0]", PROCESSOR, max_pixels=10_000)
    assert e.value.status == HTTPStatus.UNPROCESSABLE_ENTITY
    assert calls == []


# --- base64 as `base64 FILE` prints it ------------------------------------------------------------------
def test_base64_wrapped_at_76_columns_is_accepted():
    raw = tiny.png_bytes(tiny.image("red", seed=1, size=40))
    wrapped = base64.encodebytes(raw).decode()  # 76 columns and a newline, like `base64 FILE`
    assert "\n" in wrapped.strip()
    for text in (wrapped, wrapped.replace("\n", "\r\n"), "  " + wrapped.replace("\n", " \t\n")):
        got, _ = parse_json(('{"images": [%s]}' % __import__("json").dumps(text)).encode(), 4, 10**6)
        assert got == [raw]


@pytest.mark.parametrize("item", ["!!!", "aGk=!", "aGk", "aG\u00e9k=", "aGk=\n\x00", "aGk=\n!"])
def test_garbage_base64_is_still_refused(item):
    import json

    with pytest.raises(ImageRequestError) as e:
        parse_json(json.dumps({"images": [item]}).encode(), 4, 10**6)
    assert e.value.status == HTTPStatus.BAD_REQUEST and "not valid base64" in str(e.value)


# --- huge JSON numbers: ValueError, not JSONDecodeError -----------------------------------------------
@pytest.mark.parametrize("body", [b'{"images": [' + b"1" * 5000 + b"]}", b'{"images": ["aGk="], "return_all_scores": ' + b"9" * 4301 + b"}",
                                  b"1" * 10_000])
def test_a_huge_json_integer_is_400(body):
    with pytest.raises(ImageRequestError) as e:
        parse_json(body, 4, 10**6)
    assert e.value.status == HTTPStatus.BAD_REQUEST and "\n" not in str(e.value)
