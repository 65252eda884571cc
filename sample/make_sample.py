"""Regenerate the bundled sample (deterministic, no network): `python sample/make_sample.py`.

Drawn figures and garments on plain backgrounds: enough for the emulator's composite to show
what went where. One person is a PNG with alpha and one a JPEG stored sideways with an EXIF
rotation, so the demo exercises preparation; one manifest row is invalid on purpose.
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
W, H = 600, 900

GENDERS = {"ana": "woman", "ben": "man", "chi": "woman", "dev": "man"}
PEOPLE = {
    # name: (background, skin, top, bottom)
    "ana": ((214, 226, 240), (224, 187, 160), (120, 120, 120), (50, 70, 120)),
    "ben": ((236, 228, 210), (160, 110, 80), (90, 90, 90), (40, 40, 40)),
    "chi": ((220, 238, 222), (240, 205, 175), (150, 150, 150), (90, 60, 40)),
    "dev": ((238, 220, 228), (120, 80, 55), (110, 110, 110), (60, 60, 90)),
}


def person(background: tuple, skin: tuple, top: tuple, bottom: tuple) -> Image.Image:
    img = Image.new("RGB", (W, H), background)
    d = ImageDraw.Draw(img)
    cx = W // 2
    d.ellipse((cx - 55, 50, cx + 55, 170), fill=skin)  # head
    d.rectangle((cx - 20, 165, cx + 20, 195), fill=skin)  # neck
    d.rounded_rectangle((cx - 110, 190, cx + 110, 480), 30, fill=top)  # torso
    d.rounded_rectangle((cx - 150, 200, cx - 105, 470), 20, fill=skin)  # arms
    d.rounded_rectangle((cx + 105, 200, cx + 150, 470), 20, fill=skin)
    d.rectangle((cx - 100, 470, cx - 8, 840), fill=bottom)  # legs
    d.rectangle((cx + 8, 470, cx + 100, 840), fill=bottom)
    d.ellipse((cx - 110, 830, cx - 10, 870), fill=(30, 30, 30))  # shoes
    d.ellipse((cx + 10, 830, cx + 110, 870), fill=(30, 30, 30))
    return img


def tshirt(color: tuple, stripe: tuple | None) -> Image.Image:
    img = Image.new("RGB", (500, 500), (255, 255, 255))
    d = ImageDraw.Draw(img)
    body = [
        (150, 60),
        (210, 40),
        (290, 40),
        (350, 60),
        (470, 150),
        (420, 220),
        (380, 190),
        (380, 470),
        (120, 470),
        (120, 190),
        (80, 220),
        (30, 150),
    ]
    d.polygon(body, fill=color)
    if stripe:
        for y in range(90, 470, 40):
            d.rectangle((120, y, 380, y + 14), fill=stripe)
    d.ellipse((215, 25, 285, 75), fill=(255, 255, 255))  # neckline
    return img


def trousers(color: tuple) -> Image.Image:
    img = Image.new("RGB", (400, 600), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.polygon(
        [(90, 30), (310, 30), (340, 570), (220, 570), (200, 200), (180, 570), (60, 570)], fill=color
    )
    d.rectangle((90, 30, 310, 60), fill=tuple(max(0, c - 40) for c in color))  # waistband
    return img


def dress(color: tuple, dots: tuple) -> Image.Image:
    img = Image.new("RGB", (450, 650), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.polygon([(160, 30), (290, 30), (320, 240), (420, 620), (30, 620), (130, 240)], fill=color)
    for y in range(80, 600, 60):
        for x in range(120, 340, 60):
            d.ellipse((x, y, x + 18, y + 18), fill=dots)
    return img


def main() -> None:
    images = HERE / "images"
    images.mkdir(exist_ok=True)
    for name, colours in PEOPLE.items():
        img = person(*colours)
        if name == "chi":  # PNG with alpha: transparent background must come out white
            rgba = img.convert("RGBA")
            px = rgba.load()
            for y in range(0, 40):
                for x in range(W):
                    px[x, y] = (0, 0, 0, 0)
            rgba.save(images / f"person_{name}.png")
        elif name == "dev":  # stored sideways with EXIF orientation 6 (camera held rotated)
            exif = Image.Exif()
            exif[0x0112] = 6
            img.transpose(Image.Transpose.ROTATE_90).save(
                images / f"person_{name}.jpg", quality=85, exif=exif
            )
        else:
            img.save(images / f"person_{name}.jpg", quality=85)
    tshirt((200, 40, 40), None).save(images / "garment_red_tee.jpg", quality=88)
    tshirt((30, 60, 160), (240, 240, 240)).save(images / "garment_striped_tee.jpg", quality=88)
    tshirt((40, 140, 70), None).save(images / "garment_green_tee.png")
    trousers((190, 160, 110)).save(images / "garment_chinos.jpg", quality=88)
    trousers((40, 40, 40)).save(images / "garment_black_jeans.jpg", quality=88)
    dress((230, 180, 40), (250, 250, 250)).save(images / "garment_yellow_dress.jpg", quality=88)

    rows = [
        (
            "ana-red-tee",
            "images/person_ana.jpg",
            "images/garment_red_tee.jpg",
            "upper_body",
            "",
            "",
        ),
        ("ana-chinos", "images/person_ana.jpg", "images/garment_chinos.jpg", "lower_body", "", ""),
        (
            "ben-striped",
            "images/person_ben.jpg",
            "images/garment_striped_tee.jpg",
            "upper_body",
            "blue and white striped t-shirt",
            "",
        ),
        (
            "ben-jeans",
            "images/person_ben.jpg",
            "images/garment_black_jeans.jpg",
            "lower_body",
            "",
            "",
        ),
        (
            "chi-dress",
            "images/person_chi.png",
            "images/garment_yellow_dress.jpg",
            "dresses",
            "yellow polka-dot summer dress",
            "",
        ),
        (
            "chi-green",
            "images/person_chi.png",
            "images/garment_green_tee.png",
            "upper_body",
            "",
            "",
        ),
        (
            "dev-red-tee",
            "images/person_dev.jpg",
            "images/garment_red_tee.jpg",
            "upper_body",
            "",
            "",
        ),
        (
            "dev-prompt",
            "images/person_dev.jpg",
            "",
            "",
            "",
            "Help the model change into a blue striped shirt.",
        ),
        # Invalid on purpose: shoes are not a category the providers take.
        ("ana-shoes", "images/person_ana.jpg", "images/garment_black_jeans.jpg", "shoes", "", ""),
    ]
    with open(HERE / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "id",
                "person_image",
                "garment_image",
                "category",
                "garment_description",
                "prompt",
                "gender",
            ]
        )
        for row in rows:  # the refiner needs each person's gender
            writer.writerow([*row, GENDERS[row[1].split("_")[1].split(".")[0]]])


if __name__ == "__main__":
    main()
