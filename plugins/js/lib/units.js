// Unit names and conversions: the JavaScript twin of sdk/src/units.rs, with
// the same table order and the same floating-point operations, so converted
// values are bit-identical.

import { asciiLowercase, trim } from './rust.js';

const UNITS = [
  { names: ['C', '°C', 'degC', 'celsius'], quantity: 'temperature', scale: 1.0, offset: 0.0 },
  { names: ['F', '°F', 'degF', 'fahrenheit'], quantity: 'temperature', scale: 5.0 / 9.0, offset: (-32.0 * 5.0) / 9.0 },
  { names: ['K', 'kelvin'], quantity: 'temperature', scale: 1.0, offset: -273.15 },
  { names: ['Pa', 'pascal'], quantity: 'pressure', scale: 1.0, offset: 0.0 },
  { names: ['hPa', 'mbar'], quantity: 'pressure', scale: 100.0, offset: 0.0 },
  { names: ['kPa'], quantity: 'pressure', scale: 1000.0, offset: 0.0 },
  { names: ['bar'], quantity: 'pressure', scale: 100000.0, offset: 0.0 },
  { names: ['psi'], quantity: 'pressure', scale: 6894.757293168, offset: 0.0 },
  { names: ['m/s', 'mps'], quantity: 'speed', scale: 1.0, offset: 0.0 },
  { names: ['km/h', 'kph', 'kmh'], quantity: 'speed', scale: 1.0 / 3.6, offset: 0.0 },
  { names: ['mph'], quantity: 'speed', scale: 0.44704, offset: 0.0 },
  { names: ['m', 'meter', 'metre'], quantity: 'length', scale: 1.0, offset: 0.0 },
  { names: ['cm'], quantity: 'length', scale: 0.01, offset: 0.0 },
  { names: ['mm'], quantity: 'length', scale: 0.001, offset: 0.0 },
  { names: ['km'], quantity: 'length', scale: 1000.0, offset: 0.0 },
  { names: ['ft', 'feet'], quantity: 'length', scale: 0.3048, offset: 0.0 },
  { names: ['%', 'percent'], quantity: 'ratio', scale: 0.01, offset: 0.0 },
  { names: ['ratio', 'fraction'], quantity: 'ratio', scale: 1.0, offset: 0.0 },
  { names: ['J'], quantity: 'energy', scale: 1.0, offset: 0.0 },
  { names: ['Wh'], quantity: 'energy', scale: 3600.0, offset: 0.0 },
  { names: ['kWh'], quantity: 'energy', scale: 3600000.0, offset: 0.0 },
  { names: ['W'], quantity: 'power', scale: 1.0, offset: 0.0 },
  { names: ['kW'], quantity: 'power', scale: 1000.0, offset: 0.0 },
];

const utf8Length = (s) => new TextEncoder().encode(s).length;

// Names matched case-insensitively: those over 3 bytes (all ASCII), so
// ASCII case folding is exact, as with str::eq_ignore_ascii_case.
const FOLDED = UNITS.map((u) => u.names.filter((n) => utf8Length(n) > 3).map(asciiLowercase));

function find(name) {
  const n = trim(name);
  const exact = UNITS.find((u) => u.names.includes(n));
  if (exact !== undefined) return exact;
  const folded = asciiLowercase(n);
  const i = FOLDED.findIndex((names) => names.includes(folded));
  return i < 0 ? undefined : UNITS[i];
}

/**
 * `value` in `from` expressed in `to`, or null when either unit is unknown
 * or they measure different quantities.
 */
export function convert(value, from, to) {
  const f = find(from);
  if (f === undefined) return null;
  const t = find(to);
  if (t === undefined) return null;
  if (f.quantity !== t.quantity) return null;
  if (f === t) return value;
  const base = value * f.scale + f.offset;
  return (base - t.offset) / t.scale;
}
