//! The gateway's view of block ownership (`snat gateway`), as a pure state machine: it takes the
//! store's snapshot and its watch's changes, returns the route changes its datapath must make
//! (block → the holding node's address), and says which revision it may publish as applied — only
//! once the routes up to it are in place, so a node that waits for that revision before using a
//! new block never has its replies sent elsewhere. Cut off from the store, it keeps its last
//! table; after a compaction it re-reads the store and applies the difference.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::geometry::BlockId;

/// Who holds a block, as its key says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub address: Ipv4Addr,
    /// The claim's create revision.
    pub epoch: i64,
}

/// A change to the gateway's block → node table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteOp {
    Set { block: BlockId, to: Ipv4Addr },
    Clear { block: BlockId },
}

#[derive(Debug, Default)]
pub struct Routes {
    table: BTreeMap<BlockId, Owner>,
    /// Every change up to this revision is in the table.
    applied: i64,
    /// The last revision published.
    published: i64,
    /// Block routes changed since the last publication.
    dirty: bool,
}

impl Routes {
    pub fn table(&self) -> &BTreeMap<BlockId, Owner> {
        &self.table
    }

    pub fn applied(&self) -> i64 {
        self.applied
    }

    /// A full read of the store at `revision` (start, or after a compaction): the routes that
    /// differ from the table.
    pub fn reset(
        &mut self,
        revision: i64,
        blocks: impl IntoIterator<Item = (BlockId, Owner)>,
    ) -> Vec<RouteOp> {
        let fresh: BTreeMap<BlockId, Owner> = blocks.into_iter().collect();
        let mut ops = Vec::new();
        for block in self.table.keys() {
            if !fresh.contains_key(block) {
                ops.push(RouteOp::Clear { block: *block });
            }
        }
        for (block, owner) in &fresh {
            if self.table.get(block).map(|o| o.address) != Some(owner.address) {
                ops.push(RouteOp::Set {
                    block: *block,
                    to: owner.address,
                });
            }
        }
        self.table = fresh;
        if revision >= self.applied {
            self.applied = revision;
        }
        // A restarted gateway publishes what it has at once, changes or not.
        self.dirty = true;
        ops
    }

    /// Changes from the watch, in revision order, complete up to `revision`.
    pub fn apply(
        &mut self,
        revision: i64,
        changes: impl IntoIterator<Item = (BlockId, Option<Owner>)>,
    ) -> Vec<RouteOp> {
        let mut ops = Vec::new();
        for (block, owner) in changes {
            match owner {
                Some(o) => {
                    if self.table.get(&block).map(|x| x.address) != Some(o.address) {
                        ops.push(RouteOp::Set {
                            block,
                            to: o.address,
                        });
                    }
                    self.table.insert(block, o);
                }
                None => {
                    if self.table.remove(&block).is_some() {
                        ops.push(RouteOp::Clear { block });
                    }
                }
            }
            self.dirty = true;
        }
        self.applied = self.applied.max(revision);
        ops
    }

    /// The revision to publish now, if block routes changed since the last publication (call
    /// after the datapath applied the ops). A publication of its own is a change of the store
    /// too, but not of a block: it does not cause another.
    pub fn to_publish(&mut self) -> Option<i64> {
        if !self.dirty || self.applied <= self.published {
            return None;
        }
        self.dirty = false;
        self.published = self.applied;
        Some(self.applied)
    }

    /// The node a reply to `nat_ip:port` goes to, given the geometry's block of the port.
    pub fn route(&self, block: BlockId) -> Option<&Owner> {
        self.table.get(&block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn b(index: u16) -> BlockId {
        BlockId { nat_ip: IP, index }
    }

    fn owner(n: u8, epoch: i64) -> Owner {
        Owner {
            node: format!("n{n}"),
            address: Ipv4Addr::new(10, 1, 0, n),
            epoch,
        }
    }

    #[test]
    fn a_snapshot_then_changes_give_routes_and_a_revision_to_publish() {
        let mut r = Routes::default();
        let ops = r.reset(10, [(b(0), owner(1, 5)), (b(3), owner(2, 9))]);
        assert_eq!(ops.len(), 2);
        assert_eq!(r.to_publish(), Some(10));
        assert_eq!(r.to_publish(), None);
        // Node 2 releases block 3, node 1 claims it.
        let ops = r.apply(12, [(b(3), None), (b(3), Some(owner(1, 12)))]);
        assert_eq!(
            ops,
            vec![
                RouteOp::Clear { block: b(3) },
                RouteOp::Set {
                    block: b(3),
                    to: Ipv4Addr::new(10, 1, 0, 1)
                }
            ]
        );
        assert_eq!(r.to_publish(), Some(12));
        // Its own publication (revision 13) is no block change: nothing more to publish.
        assert!(r.apply(13, []).is_empty());
        assert_eq!(r.to_publish(), None);
        assert_eq!(r.route(b(3)).map(|o| o.epoch), Some(12));
    }

    #[test]
    fn a_resync_applies_only_the_difference_and_never_goes_back_in_revision() {
        let mut r = Routes::default();
        r.reset(10, [(b(0), owner(1, 5)), (b(1), owner(2, 6))]);
        r.to_publish();
        // Compacted while cut off: block 1 moved to node 3, block 0 went, block 2 came.
        let ops = r.reset(40, [(b(1), owner(3, 30)), (b(2), owner(1, 35))]);
        assert_eq!(
            ops,
            vec![
                RouteOp::Clear { block: b(0) },
                RouteOp::Set {
                    block: b(1),
                    to: Ipv4Addr::new(10, 1, 0, 3)
                },
                RouteOp::Set {
                    block: b(2),
                    to: Ipv4Addr::new(10, 1, 0, 1)
                },
            ]
        );
        assert_eq!(r.to_publish(), Some(40));
        r.apply(39, []);
        assert_eq!(r.applied(), 40);
    }
}
