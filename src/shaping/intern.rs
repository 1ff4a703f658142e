//! Interned names (domains, pools, MX hosts) as compact `u32` ids with reference counts.
//!
//! Destinations are keyed by ids, never by a fresh `String` per request; when the last
//! destination naming an id is evicted, the id and its string are freed for reuse, so
//! a flood of random domains cannot grow this table without bound.

pub use crate::idmap::IdMap;
use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};

/// Each name is stored once, in its slot; the table holds only ids and finds them by
/// hashing the slot's name. With a million destinations, each a recipient domain, a
/// `HashMap<Arc<str>, u32>` beside the slots cost 110 bytes per name; this is about 55.
#[derive(Default, Debug)]
pub struct Interner {
    ids: HashTable<u32>,
    /// SipHash with a random key: names come from recipients, i.e. from outside.
    hasher: RandomState,
    slots: Vec<Slot>,
    free: Vec<u32>,
}

#[derive(Debug)]
struct Slot {
    name: Option<Box<str>>,
    refs: u32,
}

impl Interner {
    /// The id of `name`, without creating it.
    pub fn get(&self, name: &str) -> Option<u32> {
        let h = self.hasher.hash_one(name);
        self.ids
            .find(h, |&id| {
                self.slots[id as usize].name.as_deref() == Some(name)
            })
            .copied()
    }

    /// The id of `name`, created on first use; takes one reference.
    pub fn acquire(&mut self, name: &str) -> u32 {
        if let Some(id) = self.get(name) {
            self.slots[id as usize].refs += 1;
            return id;
        }
        let slot = Slot {
            name: Some(name.into()),
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.ids.insert_unique(hasher.hash_one(name), id, |&i| {
            hasher.hash_one(slots[i as usize].name.as_deref().unwrap_or(""))
        });
        id
    }

    /// Takes one more reference to an existing id.
    pub fn add_ref(&mut self, id: u32) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            slot.refs += 1;
        }
    }

    /// Drops one reference; the name is forgotten when none remain.
    pub fn release(&mut self, id: u32) {
        let slot = &mut self.slots[id as usize];
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs == 0 {
            if let Some(name) = slot.name.take() {
                let h = self.hasher.hash_one(&*name);
                if let Ok(entry) = self.ids.find_entry(h, |&i| i == id) {
                    entry.remove();
                }
                self.free.push(id);
            }
        }
    }

    pub fn name(&self, id: u32) -> &str {
        self.slots
            .get(id as usize)
            .and_then(|s| s.name.as_deref())
            .unwrap_or("")
    }

    /// Every live id.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name.is_some())
            .map(|(i, _)| i as u32)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn shrink_to_fit(&mut self) {
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.ids
            .shrink_to_fit(|&i| hasher.hash_one(slots[i as usize].name.as_deref().unwrap_or("")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_after_release() {
        let mut i = Interner::default();
        let a = i.acquire("a.example");
        assert_eq!(i.acquire("a.example"), a);
        let b = i.acquire("b.example");
        assert_ne!(a, b);
        i.release(a);
        assert_eq!(i.get("a.example"), Some(a), "still one reference");
        i.release(a);
        assert_eq!(i.get("a.example"), None);
        let c = i.acquire("c.example");
        assert_eq!(c, a, "freed slot reused");
        assert_eq!(i.name(c), "c.example");
        assert_eq!(i.len(), 2);
        assert_eq!(i.ids().collect::<Vec<_>>(), vec![a, b]);
        i.release(b);
        assert_eq!(i.ids().collect::<Vec<_>>(), vec![c]);
    }
}
