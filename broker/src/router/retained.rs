//! Retained messages: one per topic, replaced by each retained publish and
//! cleared by an empty retained publish (and only by that).

use std::collections::HashMap;

use starling_codec::ByteString;
use tokio::time::Instant;

use super::Message;

#[derive(Debug, Default)]
pub struct RetainedStore {
    by_topic: HashMap<ByteString, Message>,
}

impl RetainedStore {
    /// Stores or clears; returns the change in the number of stored messages.
    pub fn apply(&mut self, msg: &Message) -> i64 {
        if msg.payload.is_empty() {
            -(self.by_topic.remove(&msg.topic).is_some() as i64)
        } else {
            self.by_topic
                .insert(msg.topic.clone(), msg.clone())
                .is_none() as i64
        }
    }

    /// Retained messages whose topic matches `filter`, skipping expired ones.
    pub fn matching(&self, filter: &str, now: Instant) -> Vec<Message> {
        self.by_topic
            .values()
            .filter(|m| !m.is_expired(now) && starling_model::topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }
}
