//! A map that costs one pointer until its first entry.
//!
//! Every connection has a few maps most of them never use (topic aliases,
//! the publish-verdict cache, a device's subscriptions when it only
//! publishes); an empty `HashMap` is still 48 bytes, and a parked idle
//! connection should be as small as it can be.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Boxed on purpose (clippy's `box_collection` assumes the point of a
/// collection is its contents): one pointer while empty, the map after.
#[allow(clippy::box_collection)]
#[derive(Debug)]
pub struct LazyMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for LazyMap<K, V> {
    fn default() -> Self {
        LazyMap(None)
    }
}

impl<K: Hash + Eq, V> LazyMap<K, V> {
    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.as_ref()?.get(k)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.0.get_or_insert_default().insert(k, v)
    }

    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.as_mut()?.remove(k)
    }

    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(k).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    /// Takes every entry out, giving the map's memory back.
    pub fn drain(&mut self) -> impl Iterator<Item = (K, V)> + use<K, V> {
        self.0.take().into_iter().flat_map(|m| m.into_iter())
    }

    /// Empties the map and gives its memory back.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map_and_clear_frees_it() {
        let mut m: LazyMap<String, u16> = LazyMap::default();
        assert!(m.len() == 0 && m.get("a").is_none() && m.remove("a").is_none());
        assert_eq!(m.insert("a".into(), 1), None);
        assert_eq!(m.insert("a".into(), 2), Some(1));
        m.insert("b".into(), 3);
        assert_eq!((m.len(), m.get("a").copied()), (2, Some(2)));
        assert!(m.contains_key("b") && !m.contains_key("c"));
        let mut all: Vec<_> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort();
        assert_eq!(all, [("a".to_string(), 2), ("b".to_string(), 3)]);
        assert_eq!(m.remove("b"), Some(3));
        m.clear();
        assert!(m.0.is_none() && m.len() == 0);
        m.insert("c".into(), 4);
        assert_eq!(m.drain().collect::<Vec<_>>(), [("c".to_string(), 4)]);
        assert!(m.0.is_none() && m.iter().next().is_none());
    }
}
