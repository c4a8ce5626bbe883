//! Seeded mutations of a seed input: byte-level ones for every target, and structure-aware ones
//! for JSON texts (a value in the tree replaced, removed or duplicated) and for binary headers (an
//! interesting integer written just after a key name).

use serde_json::Value;

/// SplitMix64: each input is a pure function of (seed, index), so any input can be regenerated
/// from its number alone.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, index: u64) -> Self {
        let mut rng = Self(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        rng
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that sit on the edges readers get wrong: zero, one, sign and width boundaries, and
/// sizes far beyond any file.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    1 << 20,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Numbers for JSON values: the same edges plus fractions, negatives and huge magnitudes.
const INTERESTING_JSON: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "0.5",
    "-0.1",
    "1e-30",
    "1e7",
    "2147483648",
    "4294967296",
    "1e19",
    "18446744073709551615",
    "1e300",
    "-1e300",
    "null",
    "true",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "[0]",
];

/// `seed` mutated 1 to 4 times, using `others` for splices. `json` enables tree mutations;
/// `anchors` are offsets just after key names, for header-aware integer writes.
pub fn mutate(rng: &mut Rng, seed: &[u8], others: &[Vec<u8>], json: bool, anchors: &[usize]) -> Vec<u8> {
    let mut data = seed.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if json && rng.below(2) == 0 {
            if let Some(mutated) = mutate_json(rng, &data) {
                data = mutated;
                continue;
            }
        }
        if !anchors.is_empty() && data.len() == seed.len() && rng.below(3) == 0 {
            let at = *rng.pick(anchors) + 4 * rng.below(4);
            write_integer(rng, &mut data, at);
            continue;
        }
        mutate_bytes(rng, &mut data, others);
    }
    data
}

fn write_integer(rng: &mut Rng, data: &mut [u8], at: usize) {
    let value = *rng.pick(INTERESTING);
    let width = if rng.below(2) == 0 { 4 } else { 8 };
    let bytes = value.to_le_bytes();
    for (i, b) in bytes.iter().take(width).enumerate() {
        if let Some(slot) = data.get_mut(at + i) {
            *slot = *b;
        }
    }
}

fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, others: &[Vec<u8>]) {
    if data.is_empty() {
        data.push(rng.next_u64() as u8);
        return;
    }
    let len = data.len();
    match rng.below(7) {
        0 => {
            let at = rng.below(len);
            data[at] ^= 1 << rng.below(8);
        }
        1 => {
            let at = rng.below(len);
            data[at] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'"', b'9', b'-', b' ']);
        }
        2 => {
            let at = rng.below(len);
            write_integer(rng, data, at);
        }
        3 => data.truncate(rng.below(len)),
        4 => {
            // A region duplicated in place.
            let start = rng.below(len);
            let end = (start + 1 + rng.below(64)).min(len);
            let copy = data[start..end].to_vec();
            let at = rng.below(len);
            data.splice(at..at, copy);
        }
        5 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(64)).min(len);
            data.drain(start..end);
        }
        _ => {
            // The head of this input spliced onto the tail of another seed.
            let other = rng.pick(others);
            if !other.is_empty() {
                let cut = rng.below(len);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
}

/// A JSON text with one node of its tree changed; `None` when the text is not JSON.
fn mutate_json(rng: &mut Rng, text: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(text).ok()?;
    let count = count_nodes(&value);
    let target = rng.below(count);
    let mut seen = 0;
    change_node(&mut value, target, &mut seen, rng);
    serde_json::to_vec(&value).ok()
}

fn count_nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Changes the `target`-th node (pre-order); returns true once done.
fn change_node(value: &mut Value, target: usize, seen: &mut usize, rng: &mut Rng) -> bool {
    if *seen == target {
        replace_value(value, rng);
        return true;
    }
    *seen += 1;
    match value {
        Value::Array(items) => {
            for item in items.iter_mut() {
                if change_node(item, target, seen, rng) {
                    return true;
                }
            }
        }
        Value::Object(map) => {
            for (_, child) in map.iter_mut() {
                if change_node(child, target, seen, rng) {
                    return true;
                }
            }
        }
        _ => {}
    }
    false
}

fn replace_value(value: &mut Value, rng: &mut Rng) {
    match value {
        Value::Array(items) if !items.is_empty() && rng.below(2) == 0 => {
            let i = rng.below(items.len());
            match rng.below(3) {
                0 => {
                    let copy = items[i].clone();
                    items.insert(i, copy);
                }
                1 => {
                    items.remove(i);
                }
                _ => items.truncate(i),
            }
        }
        Value::Object(map) if !map.is_empty() && rng.below(2) == 0 => {
            let key = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
            map.remove(&key);
        }
        Value::String(s) if rng.below(2) == 0 => {
            // Strings keep their shape but lose or gain characters (merges, names, paths).
            match rng.below(3) {
                0 => {
                    let keep = s.chars().count() / 2;
                    *s = s.chars().take(keep).collect();
                }
                1 => s.push_str(" t"),
                _ => s.insert(0, 'Ġ'),
            }
        }
        _ => {
            let text = rng.pick(INTERESTING_JSON);
            *value = serde_json::from_str(text).unwrap_or(Value::Null);
        }
    }
}

/// Offsets just after each run of at least 8 printable ASCII bytes (key names in a binary header).
pub fn anchors_after_names(data: &[u8]) -> Vec<usize> {
    let mut anchors = Vec::new();
    let mut run = 0;
    for (i, &b) in data.iter().enumerate() {
        if b.is_ascii_graphic() {
            run += 1;
        } else {
            if run >= 8 {
                anchors.push(i);
            }
            run = 0;
        }
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_a_function_of_seed_and_index() {
        let seed = br#"{"a": [1, 2, {"b": "x y"}], "c": 4.5}"#.to_vec();
        let others = vec![seed.clone()];
        let run = |index| mutate(&mut Rng::new(7, index), &seed, &others, true, &[]);
        assert_eq!(run(3), run(3));
        let distinct: std::collections::HashSet<Vec<u8>> = (0..50).map(run).collect();
        assert!(distinct.len() > 40, "{} distinct of 50", distinct.len());
    }
}
