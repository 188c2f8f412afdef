"""Unit conversion: factors, temperature offsets, aliases and clear refusals."""
import pytest

from tools.units import UNIT_TABLE, convert_units, find_unit


@pytest.mark.parametrize("value, source, target, expected", [
    (5, "km", "mi", "5 km = 3.106855961 mi"),
    (1, "mile", "metres", "1 mi = 1609.344 m"),
    (3, "feet", "inches", "3 ft = 36 in"),
    (1, "Kilometre", "cm", "1 km = 100000 cm"),
    (2.5, "lb", "kg", "2.5 lb = 1.133980925 kg"),
    (10, "stone", "lbs", "10 st = 140 lb"),
    (1, "gallon", "L", "1 gal = 3.785411784 L"),
    (1, "imperial gallon", "litres", "1 imp gal = 4.54609 L"),
    (90, "minutes", "hours", "90 min = 1.5 h"),
    (1, "year", "days", "1 year = 365.2425 day"),
    (60, "miles per hour", "km/h", "60 mph = 96.56064 km/h"),
    (1, "Kilometres per Hour", "m/s", "1 km/h = 0.2777777778 m/s"),
    (1, "acre", "sq m", "1 acre = 4046.856422 m²"),
    (1, "atm", "psi", "1 atm = 14.69594878 psi"),
    (1, "kWh", "MJ", "1 kWh = 3.6 MJ"),
    ("5", "km", "m", "5 km = 5000 m"),
])
def test_conversions(value, source, target, expected):
    assert convert_units(value, source, target) == expected


@pytest.mark.parametrize("value, source, target, expected", [
    (100, "C", "F", "100 °C = 212 °F"),
    (212, "°F", "celsius", "212 °F = 100 °C"),
    (-40, "fahrenheit", "C", "-40 °F = -40 °C"),
    (0, "K", "°C", "0 K = -273.15 °C"),
    (98.6, "degrees Fahrenheit", "kelvin", "98.6 °F = 310.15 K"),
    (20, "deg C", "K", "20 °C = 293.15 K"),
    (0, "C", "rankine", "0 °C = 491.67 °R"),
])
def test_temperatures_are_affine(value, source, target, expected):
    assert convert_units(value, source, target) == expected


def test_below_absolute_zero_is_refused():
    with pytest.raises(ValueError, match="below absolute zero"):
        convert_units(-300, "C", "K")
    with pytest.raises(ValueError, match="below absolute zero"):
        convert_units(-1, "K", "C")


@pytest.mark.parametrize("value, source, target, expected", [
    (1, "GiB", "MB", "1 GiB = 1073.741824 MB"),
    (1, "KB", "B", "1 kB = 1000 B"),
    (1, "kb", "bytes", "1 kB = 1000 B"),
    (1, "MB", "b", "1 MB = 8000000 bit"),
    (1, "Mb", "MB", "1 Mbit = 0.125 MB"),
    (1, "mebibyte", "KiB", "1 MiB = 1024 KiB"),
    (100, "Mbps", "MB/s", "100 Mbit/s = 12.5 MB/s"),
    (1, "MBps", "Mbps", "1 MB/s = 8 Mbit/s"),
])
def test_data_sizes_tell_bits_from_bytes(value, source, target, expected):
    assert convert_units(value, source, target) == expected


def test_incompatible_units():
    with pytest.raises(ValueError, match=r"cannot convert length \(km\) to mass \(kg\)"):
        convert_units(1, "km", "kg")
    with pytest.raises(ValueError, match="cannot convert temperature"):
        convert_units(1, "C", "m")


@pytest.mark.parametrize("unit", ["furlongs", "parsec", "", "   ", "km; rm -rf /"])
def test_unknown_units(unit):
    with pytest.raises(ValueError, match="unknown unit|unit is empty"):
        convert_units(1, unit, "m")


def test_unknown_unit_suggests_near_names():
    with pytest.raises(ValueError, match="Did you mean: kilometre"):
        convert_units(1, "kilometr", "m")


def test_ambiguous_ton_asks_which():
    with pytest.raises(ValueError, match="ambiguous.*tonne"):
        convert_units(1, "tons", "kg")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, None, "five", [1]])
def test_bad_values(value):
    with pytest.raises(ValueError, match="number"):
        convert_units(value, "m", "km")


def test_overflow_is_an_error_not_inf():
    with pytest.raises(ValueError, match="too large"):
        convert_units(1e308, "ly", "nm")


def test_every_table_symbol_finds_itself():
    for dimension, rows in UNIT_TABLE.items():
        for symbol, _, aliases in rows:
            for name in (symbol, *aliases):
                assert find_unit(name).symbol == symbol, name
