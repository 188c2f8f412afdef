"""Unit conversion: length, area, volume, mass, time, speed, pressure, energy,
data sizes, data rates and temperature.

Every unit is an affine map to its dimension's base unit:
    base = value * factor + offset
The offset is zero everywhere except for temperatures (base: kelvin), so one
formula converts both kilometres and degrees Fahrenheit.

Names are matched case-insensitively, with plurals and "per" accepted
("Kilometres per hour"). The only case-sensitive names are the ones where case
carries meaning: "b"/"Mb"/"Gb" are bits, "B"/"MB"/"GB" bytes; "Cal" is a kilocalorie.
"""
# No `from __future__ import annotations`: the agent reads tool annotations as real types.
import difflib
import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    symbol: str
    dimension: str
    factor: float
    offset: float = 0.0


# dimension -> [(symbol, factor, aliases matched case-insensitively)]
UNIT_TABLE: dict[str, list[tuple[str, float, tuple[str, ...]]]] = {
    "length": [
        ("m", 1.0, ("metre", "meter")),
        ("km", 1e3, ("kilometre", "kilometer", "kms")),
        ("cm", 1e-2, ("centimetre", "centimeter")),
        ("mm", 1e-3, ("millimetre", "millimeter")),
        ("µm", 1e-6, ("um", "micrometre", "micrometer", "micron")),
        ("nm", 1e-9, ("nanometre", "nanometer")),
        ("in", 0.0254, ("inch", "inches", '"')),
        ("ft", 0.3048, ("foot", "feet", "'")),
        ("yd", 0.9144, ("yard",)),
        ("mi", 1609.344, ("mile", "statute mile")),
        ("nmi", 1852.0, ("nautical mile",)),
        ("au", 149_597_870_700.0, ("astronomical unit",)),
        ("ly", 9_460_730_472_580_800.0, ("light year", "light-year", "lightyear")),
    ],
    "area": [
        ("m²", 1.0, ("m2", "sq m", "square metre", "square meter")),
        ("km²", 1e6, ("km2", "sq km", "square kilometre", "square kilometer")),
        ("cm²", 1e-4, ("cm2", "sq cm", "square centimetre", "square centimeter")),
        ("mm²", 1e-6, ("mm2", "sq mm", "square millimetre", "square millimeter")),
        ("ha", 1e4, ("hectare",)),
        ("acre", 4046.8564224, ("ac",)),
        ("ft²", 0.09290304, ("ft2", "sq ft", "square foot", "square feet")),
        ("in²", 0.00064516, ("in2", "sq in", "square inch", "square inches")),
        ("yd²", 0.83612736, ("yd2", "sq yd", "square yard")),
        ("mi²", 2_589_988.110336, ("mi2", "sq mi", "square mile")),
    ],
    "volume": [
        ("L", 1.0, ("l", "litre", "liter", "ltr")),
        ("mL", 1e-3, ("ml", "millilitre", "milliliter")),
        ("cL", 1e-2, ("cl", "centilitre", "centiliter")),
        ("dL", 1e-1, ("dl", "decilitre", "deciliter")),
        ("m³", 1e3, ("m3", "cubic metre", "cubic meter")),
        ("cm³", 1e-3, ("cm3", "cc", "cubic centimetre", "cubic centimeter")),
        ("ft³", 28.316846592, ("ft3", "cu ft", "cubic foot", "cubic feet")),
        ("in³", 0.016387064, ("in3", "cu in", "cubic inch", "cubic inches")),
        ("gal", 3.785411784, ("gallon", "us gallon", "us gal")),
        ("imp gal", 4.54609, ("imperial gallon", "uk gallon")),
        ("qt", 0.946352946, ("quart", "us quart")),
        ("pt", 0.473176473, ("pint", "us pint")),
        ("imp pt", 0.56826125, ("imperial pint", "uk pint")),
        ("cup", 0.2365882365, ("us cup",)),
        ("fl oz", 0.0295735295625, ("fluid ounce", "us fluid ounce", "floz")),
        ("imp fl oz", 0.0284130625, ("imperial fluid ounce", "uk fluid ounce")),
        ("tbsp", 0.01478676478125, ("tablespoon",)),
        ("tsp", 0.00492892159375, ("teaspoon",)),
    ],
    "mass": [
        ("kg", 1.0, ("kilogram", "kilogramme", "kilo")),
        ("g", 1e-3, ("gram", "gramme")),
        ("mg", 1e-6, ("milligram", "milligramme")),
        ("µg", 1e-9, ("ug", "mcg", "microgram")),
        ("t", 1e3, ("tonne", "metric ton", "metric tonne")),
        ("short ton", 907.18474, ("us ton",)),
        ("long ton", 1016.0469088, ("imperial ton", "uk ton")),
        ("lb", 0.45359237, ("lbs", "pound", "pound mass")),
        ("oz", 0.028349523125, ("ounce",)),
        ("st", 6.35029318, ("stone",)),
    ],
    "time": [
        ("s", 1.0, ("sec", "second", "secs")),
        ("ms", 1e-3, ("millisecond", "msec")),
        ("µs", 1e-6, ("us", "microsecond")),
        ("ns", 1e-9, ("nanosecond",)),
        ("min", 60.0, ("minute", "mins")),
        ("h", 3600.0, ("hr", "hour", "hrs")),
        ("day", 86_400.0, ("d", "days")),
        ("week", 604_800.0, ("wk", "weeks")),
        ("fortnight", 1_209_600.0, ()),
        # Gregorian averages: 365.2425 days a year, a twelfth of that a month.
        ("month", 2_629_746.0, ("mo",)),
        ("year", 31_556_952.0, ("yr", "years", "yrs")),
        ("decade", 315_569_520.0, ()),
        ("century", 3_155_695_200.0, ("centuries",)),
    ],
    "speed": [
        ("m/s", 1.0, ("mps", "metre/second", "meter/second", "metre/s", "meter/s")),
        ("km/h", 1 / 3.6, ("kph", "kmh", "kmph", "kilometre/hour", "kilometer/hour", "km/hr")),
        ("mph", 0.44704, ("mi/h", "mile/hour", "mi/hr")),
        ("kn", 1852 / 3600, ("knot", "kt", "kts", "nautical mile/hour")),
        ("ft/s", 0.3048, ("fps", "foot/second", "feet/second")),
    ],
    "pressure": [
        ("Pa", 1.0, ("pa", "pascal")),
        ("hPa", 100.0, ("hpa", "hectopascal")),
        ("kPa", 1e3, ("kpa", "kilopascal")),
        ("MPa", 1e6, ("mpa", "megapascal")),
        ("bar", 1e5, ()),
        ("mbar", 100.0, ("millibar",)),
        ("atm", 101_325.0, ("atmosphere",)),
        ("psi", 6894.757293168361, ("pound/square inch",)),
        ("mmHg", 133.322387415, ("mmhg", "torr")),
        ("inHg", 3386.389, ("inhg", "inch of mercury")),
    ],
    "energy": [
        ("J", 1.0, ("j", "joule")),
        ("kJ", 1e3, ("kj", "kilojoule")),
        ("MJ", 1e6, ("mj", "megajoule")),
        ("cal", 4.184, ("calorie", "small calorie")),
        ("kcal", 4184.0, ("kilocalorie", "food calorie")),
        ("Wh", 3600.0, ("wh", "watt hour", "watt-hour")),
        ("kWh", 3.6e6, ("kwh", "kilowatt hour", "kilowatt-hour")),
        ("BTU", 1055.05585262, ("btu", "british thermal unit")),
        ("eV", 1.602176634e-19, ("ev", "electronvolt", "electron volt")),
    ],
    # Decimal prefixes are powers of 1000, binary ones (KiB, MiB) powers of 1024.
    "data size": [
        ("bit", 0.125, ("bits",)),
        ("B", 1.0, ("byte",)),
        ("kB", 1e3, ("kb", "kilobyte")),
        ("MB", 1e6, ("mb", "megabyte")),
        ("GB", 1e9, ("gb", "gigabyte")),
        ("TB", 1e12, ("tb", "terabyte")),
        ("PB", 1e15, ("pb", "petabyte")),
        ("KiB", 2.0**10, ("kib", "kibibyte")),
        ("MiB", 2.0**20, ("mib", "mebibyte")),
        ("GiB", 2.0**30, ("gib", "gibibyte")),
        ("TiB", 2.0**40, ("tib", "tebibyte")),
        ("PiB", 2.0**50, ("pib", "pebibyte")),
        ("kbit", 125.0, ("kilobit",)),
        ("Mbit", 125e3, ("megabit",)),
        ("Gbit", 125e6, ("gigabit",)),
        ("Tbit", 125e9, ("terabit",)),
    ],
    # Rates are in bits per second, the way networks are sold.
    "data rate": [
        ("bit/s", 1.0, ("bps", "bits/s", "bit/second")),
        ("kbit/s", 1e3, ("kbps", "kilobit/second")),
        ("Mbit/s", 1e6, ("mbps", "megabit/second")),
        ("Gbit/s", 1e9, ("gbps", "gigabit/second")),
        ("B/s", 8.0, ("byte/s", "byte/second")),
        ("kB/s", 8e3, ("kb/s", "kilobyte/second")),
        ("MB/s", 8e6, ("mb/s", "megabyte/second")),
        ("GB/s", 8e9, ("gb/s", "gigabyte/second")),
        ("MiB/s", 8 * 2.0**20, ("mib/s",)),
    ],
}

# Symbols whose case is the meaning: they only match exactly as written.
CASE_SENSITIVE_SYMBOLS: dict[str, tuple[str, str]] = {
    "b": ("data size", "bit"), "Kb": ("data size", "kbit"), "Mb": ("data size", "Mbit"),
    "Gb": ("data size", "Gbit"), "Tb": ("data size", "Tbit"),
    "Mb/s": ("data rate", "Mbit/s"), "Gb/s": ("data rate", "Gbit/s"), "Kb/s": ("data rate", "kbit/s"),
    "MBps": ("data rate", "MB/s"), "GBps": ("data rate", "GB/s"),
    "Cal": ("energy", "kcal"),
}

# (symbol, factor to kelvin, offset to kelvin, aliases)
TEMPERATURE_UNITS = [
    ("°C", 1.0, 273.15, ("c", "celsius", "centigrade", "degc")),
    ("°F", 5 / 9, 273.15 - 32 * 5 / 9, ("f", "fahrenheit", "degf")),
    ("K", 1.0, 0.0, ("k", "kelvin", "kelvins")),
    ("°R", 5 / 9, 0.0, ("rankine", "degr")),
]

AMBIGUOUS = {
    "ton": "'ton' is ambiguous: use 'tonne' (1000 kg), 'short ton' (US, 907 kg) or 'long ton' (UK, 1016 kg)",
}


def _fold(name: str) -> str:
    """Case- and spelling-insensitive key: 'Kilometres  per Hour' -> 'kilometres/hour'."""
    key = name.strip().lower()
    key = key.replace("μ", "µ").replace("²", "2").replace("³", "3").replace("^", "")
    key = key.replace("°", "").replace("º", "")
    key = re.sub(r"^(degrees?|deg)\s+", "", key)
    key = re.sub(r"\s+per\s+", "/", key)
    key = re.sub(r"\s*/\s*", "/", key)
    return " ".join(key.split())


def _singular(key: str) -> str:
    """Drop a plural 's' from every word: 'miles/hours' -> 'mile/hour'."""
    return re.sub(r"(?<=[a-z]{3})s\b", "", key)


def _build_index() -> tuple[dict[str, Unit], dict[str, Unit]]:
    exact: dict[str, Unit] = {}
    folded: dict[str, Unit] = {}
    for dimension, rows in UNIT_TABLE.items():
        for symbol, factor, aliases in rows:
            unit = Unit(symbol, dimension, factor)
            exact[symbol] = unit
            for name in (symbol, *aliases):
                folded.setdefault(_fold(name), unit)
    for symbol, factor, offset, aliases in TEMPERATURE_UNITS:
        unit = Unit(symbol, "temperature", factor, offset)
        exact[symbol] = unit
        for name in (symbol, *aliases):
            folded.setdefault(_fold(name), unit)
    for written, (dimension, symbol) in CASE_SENSITIVE_SYMBOLS.items():
        exact[written] = exact[symbol]
    return exact, folded


EXACT_UNITS, FOLDED_UNITS = _build_index()


def find_unit(name: str) -> Unit:
    """Look a unit up by symbol or name; ValueError with suggestions if unknown."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("unit is empty; give a unit such as 'km', 'lb' or 'celsius'")
    written = name.strip()
    if written in EXACT_UNITS:
        return EXACT_UNITS[written]
    key = _fold(written)
    if key in AMBIGUOUS or _singular(key) in AMBIGUOUS:
        raise ValueError(AMBIGUOUS.get(key) or AMBIGUOUS[_singular(key)])
    unit = FOLDED_UNITS.get(key) or FOLDED_UNITS.get(_singular(key))
    if unit is None:
        close = difflib.get_close_matches(key, FOLDED_UNITS, n=3, cutoff=0.7)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown unit {name!r}.{hint}")
    return unit


def _as_number(value: object) -> float:
    # Models sometimes send numbers as strings ("5"); accept those, refuse the rest.
    if isinstance(value, str):
        try:
            value = float(value.strip().replace(",", ""))
        except ValueError:
            raise ValueError(f"value must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"value must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError("value must be a finite number")
    return value


def _format_number(value: float) -> str:
    # 10 significant digits: exact enough for any everyday use, free of float noise.
    text = f"{value:.10g}"
    return "0" if text == "-0" else text


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units of length, area, volume, mass, time, speed,
    pressure, energy, data size, data rate or temperature (Celsius, Fahrenheit, Kelvin).

    Gallons, quarts, pints, cups and fluid ounces are US measures unless prefixed with "imperial".
    Data sizes: "kB", "MB", "GB" are powers of 1000 and "KiB", "MiB", "GiB" powers of 1024;
    "b", "Mb", "Mbit" are bits. Temperatures: "C", "F", "K" (celsius, fahrenheit, kelvin).

    Args:
        value: The number to convert.
        from_unit: Unit of the value, as a symbol or name, e.g. "km", "miles", "lb", "°F", "MiB", "km/h".
        to_unit: Unit to convert to, of the same kind as from_unit.

    Returns:
        The conversion as text, e.g. "5 km = 3.106855961 mi".
    """
    value = _as_number(value)
    source, target = find_unit(from_unit), find_unit(to_unit)
    if source.dimension != target.dimension:
        raise ValueError(f"cannot convert {source.dimension} ({source.symbol}) "
                         f"to {target.dimension} ({target.symbol})")
    base = value * source.factor + source.offset
    if source.dimension == "temperature" and base < -1e-9:
        raise ValueError(f"{_format_number(value)} {source.symbol} is below absolute zero")
    result = (base - target.offset) / target.factor
    if not math.isfinite(result):
        raise ValueError("result is too large to represent")
    return f"{_format_number(value)} {source.symbol} = {_format_number(result)} {target.symbol}"
