//! Choosing the next token from logits: repeat penalty, temperature, top-k,
//! top-p, and a seeded generator so that the same seed gives the same text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How many recent tokens the repeat penalty looks at (llama.cpp's default).
const PENALTY_WINDOW: usize = 64;

/// One generation's sampling settings and random generator; a sequence
/// owns one, so seeded sequences stay reproducible in any batch.
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repeat_penalty: f32,
    rng: StdRng,
}

impl Sampler {
    /// Settings as in [`crate::GenerationParams`], made safe rather than
    /// refused: a negative temperature is greedy, a `top_p` outside (0, 1)
    /// or a `repeat_penalty` of 0 or less turns that step off. Without a
    /// seed the generator is seeded from the OS.
    pub fn new(
        temperature: f32,
        top_k: u32,
        top_p: f32,
        repeat_penalty: f32,
        seed: Option<u64>,
    ) -> Sampler {
        Sampler {
            temperature: temperature.max(0.0),
            top_k: top_k as usize,
            top_p: if top_p > 0.0 && top_p < 1.0 {
                top_p
            } else {
                1.0
            },
            repeat_penalty: if repeat_penalty > 0.0 {
                repeat_penalty
            } else {
                1.0
            },
            rng: match seed {
                Some(s) => StdRng::seed_from_u64(s),
                None => StdRng::from_os_rng(),
            },
        }
    }

    /// Picks a token. `allowed`, when given, says which tokens the constraint
    /// accepts; `None` is returned when no token is allowed.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        recent: &[u32],
        allowed: Option<&dyn Fn(u32) -> bool>,
    ) -> Option<u32> {
        if self.repeat_penalty != 1.0 {
            let start = recent.len().saturating_sub(PENALTY_WINDOW);
            let mut seen = recent[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / self.repeat_penalty
                    } else {
                        *l * self.repeat_penalty
                    };
                }
            }
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(i, l)| l.is_finite() && allowed.is_none_or(|f| f(*i as u32)))
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        if self.temperature == 0.0 {
            // Ties go to the lowest id, so greedy output is a function of the logits alone.
            return candidates
                .iter()
                .fold(None, |best: Option<(u32, f32)>, &(i, l)| match best {
                    Some((_, bl)) if bl >= l => best,
                    _ => Some((i, l)),
                })
                .map(|(i, _)| i);
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.top_k > 0 && candidates.len() > self.top_k {
            candidates.truncate(self.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|(_, l)| ((l - max) / self.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let mut r: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return Some(candidates[i].0);
            }
            r -= p;
        }
        Some(candidates[probs.len() - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_respects_the_mask() {
        let mut s = Sampler::new(0.0, 0, 1.0, 1.0, Some(1));
        let mut logits = vec![0.1, 3.0, 2.0, -1.0];
        assert_eq!(s.sample(&mut logits.clone(), &[], None), Some(1));
        let even = |t: u32| t.is_multiple_of(2);
        assert_eq!(s.sample(&mut logits, &[], Some(&even)), Some(2));
        let none = |_: u32| false;
        assert_eq!(s.sample(&mut [1.0, 2.0], &[], Some(&none)), None);
    }

    #[test]
    fn repeat_penalty_demotes_recent_tokens() {
        let mut s = Sampler::new(0.0, 0, 1.0, 2.0, None);
        let mut logits = vec![1.0, 1.5, 0.0];
        assert_eq!(s.sample(&mut logits, &[1], None), Some(0));
    }

    #[test]
    fn same_seed_same_choices_and_top_k_one_is_greedy() {
        let logits = vec![0.5f32, 0.4, 0.3, 0.2, 0.1];
        let run = |seed| {
            let mut s = Sampler::new(1.0, 0, 1.0, 1.0, Some(seed));
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[], None).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut s = Sampler::new(1.0, 1, 1.0, 1.0, Some(3));
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone(), &[], None), Some(0));
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = vec![10.0f32, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(1.0, 0, 0.5, 1.0, Some(5));
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone(), &[], None), Some(0));
        }
    }
}
