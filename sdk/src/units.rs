//! Unit names and conversions between units of the same quantity.
//!
//! Units are matched after trimming, case-insensitively for names (`celsius`)
//! and exactly for symbols where case matters (`K` vs `k`). Conversions are
//! affine (`value * scale + offset` into the quantity's base unit).

/// What a unit measures; [`convert`] converts only within one quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    /// `C`, `F`, `K`.
    Temperature,
    /// `Pa`, `hPa` (`mbar`), `kPa`, `bar`, `psi`.
    Pressure,
    /// `m/s`, `km/h`, `mph`.
    Speed,
    /// `m`, `cm`, `mm`, `km`, `ft`.
    Length,
    /// `%` and `ratio` (a fraction of 1).
    Ratio,
    /// `J`, `Wh`, `kWh`.
    Energy,
    /// `W`, `kW`.
    Power,
}

struct Unit {
    names: &'static [&'static str],
    canonical: &'static str,
    quantity: Quantity,
    /// Into the base unit: base = value * scale + offset.
    scale: f64,
    offset: f64,
}

const UNITS: &[Unit] = &[
    Unit {
        names: &["C", "°C", "degC", "celsius"],
        canonical: "C",
        quantity: Quantity::Temperature,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["F", "°F", "degF", "fahrenheit"],
        canonical: "F",
        quantity: Quantity::Temperature,
        scale: 5.0 / 9.0,
        offset: -32.0 * 5.0 / 9.0,
    },
    Unit {
        names: &["K", "kelvin"],
        canonical: "K",
        quantity: Quantity::Temperature,
        scale: 1.0,
        offset: -273.15,
    },
    Unit {
        names: &["Pa", "pascal"],
        canonical: "Pa",
        quantity: Quantity::Pressure,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["hPa", "mbar"],
        canonical: "hPa",
        quantity: Quantity::Pressure,
        scale: 100.0,
        offset: 0.0,
    },
    Unit {
        names: &["kPa"],
        canonical: "kPa",
        quantity: Quantity::Pressure,
        scale: 1000.0,
        offset: 0.0,
    },
    Unit {
        names: &["bar"],
        canonical: "bar",
        quantity: Quantity::Pressure,
        scale: 100_000.0,
        offset: 0.0,
    },
    Unit {
        names: &["psi"],
        canonical: "psi",
        quantity: Quantity::Pressure,
        scale: 6_894.757_293_168,
        offset: 0.0,
    },
    Unit {
        names: &["m/s", "mps"],
        canonical: "m/s",
        quantity: Quantity::Speed,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["km/h", "kph", "kmh"],
        canonical: "km/h",
        quantity: Quantity::Speed,
        scale: 1.0 / 3.6,
        offset: 0.0,
    },
    Unit {
        names: &["mph"],
        canonical: "mph",
        quantity: Quantity::Speed,
        scale: 0.447_04,
        offset: 0.0,
    },
    Unit {
        names: &["m", "meter", "metre"],
        canonical: "m",
        quantity: Quantity::Length,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["cm"],
        canonical: "cm",
        quantity: Quantity::Length,
        scale: 0.01,
        offset: 0.0,
    },
    Unit {
        names: &["mm"],
        canonical: "mm",
        quantity: Quantity::Length,
        scale: 0.001,
        offset: 0.0,
    },
    Unit {
        names: &["km"],
        canonical: "km",
        quantity: Quantity::Length,
        scale: 1000.0,
        offset: 0.0,
    },
    Unit {
        names: &["ft", "feet"],
        canonical: "ft",
        quantity: Quantity::Length,
        scale: 0.3048,
        offset: 0.0,
    },
    Unit {
        names: &["%", "percent"],
        canonical: "%",
        quantity: Quantity::Ratio,
        scale: 0.01,
        offset: 0.0,
    },
    Unit {
        names: &["ratio", "fraction"],
        canonical: "ratio",
        quantity: Quantity::Ratio,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["J"],
        canonical: "J",
        quantity: Quantity::Energy,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["Wh"],
        canonical: "Wh",
        quantity: Quantity::Energy,
        scale: 3600.0,
        offset: 0.0,
    },
    Unit {
        names: &["kWh"],
        canonical: "kWh",
        quantity: Quantity::Energy,
        scale: 3_600_000.0,
        offset: 0.0,
    },
    Unit {
        names: &["W"],
        canonical: "W",
        quantity: Quantity::Power,
        scale: 1.0,
        offset: 0.0,
    },
    Unit {
        names: &["kW"],
        canonical: "kW",
        quantity: Quantity::Power,
        scale: 1000.0,
        offset: 0.0,
    },
];

fn find(name: &str) -> Option<&'static Unit> {
    let name = name.trim();
    UNITS.iter().find(|u| u.names.contains(&name)).or_else(|| {
        UNITS.iter().find(|u| {
            u.names
                .iter()
                .any(|n| n.len() > 3 && n.eq_ignore_ascii_case(name))
        })
    })
}

/// The canonical spelling of a known unit (`"°C"` → `"C"`).
pub fn canonical(name: &str) -> Option<&'static str> {
    find(name).map(|u| u.canonical)
}

/// What a known unit measures; `None` for an unknown unit.
pub fn quantity(name: &str) -> Option<Quantity> {
    find(name).map(|u| u.quantity)
}

/// `value` in `from` expressed in `to`; `None` when either unit is unknown or
/// they measure different quantities.
pub fn convert(value: f64, from: &str, to: &str) -> Option<f64> {
    let (f, t) = (find(from)?, find(to)?);
    if f.quantity != t.quantity {
        return None;
    }
    if std::ptr::eq(f, t) {
        return Some(value);
    }
    let base = value * f.scale + f.offset;
    Some((base - t.offset) / t.scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(convert(212.0, "°F", "C").unwrap(), 100.0));
        assert!(close(convert(0.0, "celsius", "K").unwrap(), 273.15));
        assert!(close(convert(1.0, "bar", "hPa").unwrap(), 1000.0));
        assert!(close(convert(36.0, "km/h", "m/s").unwrap(), 10.0));
        assert!(close(convert(50.0, "%", "ratio").unwrap(), 0.5));
        assert_eq!(convert(1.0, "C", "bar"), None);
        assert_eq!(convert(1.0, "furlong", "m"), None);
        assert_eq!(canonical("degC"), Some("C"));
        assert_eq!(canonical("k"), None, "lower-case k is not kelvin");
    }
}
