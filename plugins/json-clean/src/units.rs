//! Unit conversion table. Every unit maps to a quantity and an affine
//! transform to that quantity's base unit: `base = value * scale + offset`.

/// Unit symbols accepted in config, case-sensitive (so `mm` ≠ `Mm` stays
/// unambiguous), with the quantity they measure.
const UNITS: &[(&str, Quantity, f64, f64)] = &[
    // temperature, base kelvin
    ("K", Quantity::Temperature, 1.0, 0.0),
    ("C", Quantity::Temperature, 1.0, 273.15),
    (
        "F",
        Quantity::Temperature,
        5.0 / 9.0,
        273.15 - 32.0 * 5.0 / 9.0,
    ),
    // pressure, base pascal
    ("Pa", Quantity::Pressure, 1.0, 0.0),
    ("hPa", Quantity::Pressure, 100.0, 0.0),
    ("kPa", Quantity::Pressure, 1000.0, 0.0),
    ("bar", Quantity::Pressure, 100_000.0, 0.0),
    ("mbar", Quantity::Pressure, 100.0, 0.0),
    ("psi", Quantity::Pressure, 6_894.757_293_168, 0.0),
    ("inHg", Quantity::Pressure, 3_386.389, 0.0),
    // speed, base m/s
    ("m/s", Quantity::Speed, 1.0, 0.0),
    ("km/h", Quantity::Speed, 1000.0 / 3600.0, 0.0),
    ("mph", Quantity::Speed, 0.447_04, 0.0),
    ("kn", Quantity::Speed, 1852.0 / 3600.0, 0.0),
    // length, base metre
    ("mm", Quantity::Length, 0.001, 0.0),
    ("cm", Quantity::Length, 0.01, 0.0),
    ("m", Quantity::Length, 1.0, 0.0),
    ("km", Quantity::Length, 1000.0, 0.0),
    ("in", Quantity::Length, 0.0254, 0.0),
    ("ft", Quantity::Length, 0.3048, 0.0),
    ("mi", Quantity::Length, 1609.344, 0.0),
    // mass, base kilogram
    ("g", Quantity::Mass, 0.001, 0.0),
    ("kg", Quantity::Mass, 1.0, 0.0),
    ("lb", Quantity::Mass, 0.453_592_37, 0.0),
    ("oz", Quantity::Mass, 0.028_349_523_125, 0.0),
    // energy, base joule
    ("J", Quantity::Energy, 1.0, 0.0),
    ("kJ", Quantity::Energy, 1000.0, 0.0),
    ("Wh", Quantity::Energy, 3600.0, 0.0),
    ("kWh", Quantity::Energy, 3_600_000.0, 0.0),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Temperature,
    Pressure,
    Speed,
    Length,
    Mass,
    Energy,
}

/// A resolved `from` → `to` conversion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversion {
    scale: f64,
    offset: f64,
}

impl Conversion {
    pub fn new(from: &str, to: &str) -> Result<Conversion, String> {
        let (fq, fs, fo) = lookup(from)?;
        let (tq, ts, to_off) = lookup(to)?;
        if fq != tq {
            return Err(format!(
                "cannot convert {from} ({fq:?}) to {to} ({tq:?}): different quantities"
            ));
        }
        // value → base → target, folded into one affine map.
        Ok(Conversion {
            scale: fs / ts,
            offset: (fo - to_off) / ts,
        })
    }

    pub fn apply(&self, value: f64) -> f64 {
        value * self.scale + self.offset
    }
}

fn lookup(unit: &str) -> Result<(Quantity, f64, f64), String> {
    UNITS
        .iter()
        .find(|(name, ..)| *name == unit)
        .map(|&(_, q, s, o)| (q, s, o))
        .ok_or_else(|| {
            let known: Vec<&str> = UNITS.iter().map(|u| u.0).collect();
            format!("unknown unit `{unit}`; known units: {}", known.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(from: &str, to: &str, v: f64) -> f64 {
        Conversion::new(from, to).unwrap().apply(v)
    }

    #[test]
    fn temperatures() {
        assert!((conv("F", "C", 212.0) - 100.0).abs() < 1e-9);
        assert!((conv("F", "C", 32.0)).abs() < 1e-9);
        assert!((conv("C", "F", -40.0) + 40.0).abs() < 1e-9);
        assert!((conv("C", "K", 0.0) - 273.15).abs() < 1e-9);
    }

    #[test]
    fn linear_units() {
        assert!((conv("km/h", "m/s", 36.0) - 10.0).abs() < 1e-9);
        assert!((conv("hPa", "bar", 1013.25) - 1.01325).abs() < 1e-9);
        assert!((conv("kWh", "J", 1.0) - 3.6e6).abs() < 1e-6);
    }

    #[test]
    fn rejects_mismatch_and_unknown() {
        assert!(
            Conversion::new("C", "m")
                .unwrap_err()
                .contains("different quantities")
        );
        assert!(
            Conversion::new("furlong", "m")
                .unwrap_err()
                .contains("unknown unit")
        );
    }
}
