//! An erasure-coded object's I/O (layout and code: [`crate::ec`]).
//!
//! The owner's machinery is the same as for copies, counted in rows: a
//! write of object blocks becomes, per stripe, one operation over the rows
//! it touches, and every component not away gets its own chunk of those
//! rows under the operation's LSN (data or parity). A write reads the data
//! chunks of those rows first (from their components, or rebuilt from the
//! others where one is away), lays its blocks over them and writes every
//! chunk of the rows, each with what it replaces: so every component
//! holds, at every LSN, its part of one codeword, tracking bitmaps of rows
//! are complete on any component, a component behind is brought back by
//! rebuilding its chunks from the others, and a new owner can roll a write
//! that reached only some chunks back. See `docs/design/erasure-coding.md`.

use bytes::BytesMut;

use super::*;
use crate::ec::Piece;

/// The pieces read, or the error that decides the read's fate, whichever
/// piece it came from: `Deposed` (the caller goes to the new owner), then
/// any error a component answered (the read fails at once), and only then
/// `Unavailable` (held until the object is back). A read over several
/// stripes must not be held because one stripe's hosts went unanswered
/// while another's chunk is unreadable, nor fail at once or be held
/// according to which stripe answered first.
fn first_error(parts: Vec<Result<Bytes, ObjectError>>) -> Result<Vec<Bytes>, ObjectError> {
    let rank = |error: &ObjectError| match error {
        ObjectError::Deposed => 0,
        ObjectError::Unavailable => 2,
        _ => 1,
    };
    let mut worst: Option<ObjectError> = None;
    let mut read = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Ok(bytes) => read.push(bytes),
            Err(error) if worst.as_ref().is_none_or(|worst| rank(&error) < rank(worst)) => worst = Some(error),
            Err(_) => {}
        }
    }
    worst.map_or(Ok(read), Err)
}

impl<T: Transport> Object<T> {
    fn stripe_lock(&self, stripe: u64) -> &tokio::sync::Mutex<()> {
        &self.stripes[(stripe % STRIPE_LOCKS as u64) as usize]
    }

    /// Writes whole object blocks from `first`, stripe by stripe (the
    /// stripes concurrently).
    pub(super) async fn write_erasure(
        self: &Arc<Self>,
        layout: Layout,
        first: u64,
        data: Bytes,
    ) -> Result<(), ObjectError> {
        let count = (data.len() / BLOCK_SIZE) as u64;
        let stripe_blocks = layout.stripe_blocks();
        let mut writes = Vec::new();
        let mut block = first;
        while block < first + count {
            let stripe = block / stripe_blocks;
            let end = ((stripe + 1) * stripe_blocks).min(first + count);
            let part = data.slice(ec::bytes(block - first)..ec::bytes(end - first));
            writes.push(self.write_stripe(layout, stripe, block, part));
            block = end;
        }
        // Every stripe's write runs to its end, even after another failed:
        // dropping one would let go of its stripe lock while its chunks
        // may still be on their way, and the next write to the stripe
        // would read rows half written.
        futures::future::join_all(writes).await.into_iter().collect::<Result<Vec<()>, ObjectError>>()?;
        Ok(())
    }

    /// Writes object blocks from `block`, all in stripe `stripe`.
    async fn write_stripe(
        self: &Arc<Self>,
        layout: Layout,
        stripe: u64,
        block: u64,
        data: Bytes,
    ) -> Result<(), ObjectError> {
        let pieces = layout.pieces(block, (data.len() / BLOCK_SIZE) as u64);
        let row = pieces.iter().map(|piece| piece.row).min().expect("a piece");
        let rows = pieces.iter().map(|piece| piece.row + piece.count).max().expect("a piece") - row;
        let _stripe = self.stripe_lock(stripe).lock().await;
        let lay = |columns: &mut [Vec<u8>]| {
            for piece in &pieces {
                let at = ec::bytes(piece.row - row);
                let from = ec::bytes(piece.block - block);
                columns[piece.position][at..at + ec::bytes(piece.count)]
                    .copy_from_slice(&data[from..from + ec::bytes(piece.count)]);
            }
        };
        // A whole stripe while every component is up to date: nothing to
        // read, parity computed once, and each component reads what its
        // chunk replaces itself (it holds every earlier write to the
        // stripe: they were on every active component before this one
        // took the stripe).
        let whole = data.len() == ec::bytes(layout.stripe_blocks());
        if whole && self.statuses().iter().all(|status| *status == Status::Active) {
            let mut columns = vec![vec![0u8; ec::bytes(rows)]; layout.data];
            lay(&mut columns);
            self.full_stripe_writes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("objects_erasure_full_stripe_writes_total").increment(1);
            return self.write_rows(layout, stripe, row, columns, None).await;
        }
        // Otherwise every data chunk of the rows as it stands: the rows'
        // new content is laid over it, and each component keeps what its
        // chunk held until the write is on every active component.
        let wanted: Vec<usize> = (0..layout.data).collect();
        let mut read = self.read_rows(layout, stripe, row, rows, &wanted).await?;
        let old: Vec<Vec<u8>> =
            (0..layout.data).map(|position| read[position].take().expect("read or rebuilt")).collect();
        let mut columns = old.clone();
        lay(&mut columns);
        self.write_rows(layout, stripe, row, columns, Some(old)).await
    }

    /// Writes rows from `row` of stripe `stripe`: these data chunks and
    /// their parity, each to its component under one LSN, with what it
    /// replaces (`old`, the data chunks as they were), or, with `None`,
    /// for each component to read itself. The caller holds the stripe.
    async fn write_rows(
        self: &Arc<Self>,
        layout: Layout,
        stripe: u64,
        row: u64,
        columns: Vec<Vec<u8>>,
        old: Option<Vec<Vec<u8>>>,
    ) -> Result<(), ObjectError> {
        let rows = (columns[0].len() / BLOCK_SIZE) as u64;
        let code = |columns: &[Vec<u8>]| {
            let refs: Vec<&[u8]> = columns.iter().map(Vec::as_slice).collect();
            layout.encode(&refs).map_err(|error| ObjectError::Read(error.to_string()))
        };
        let parity = code(&columns)?;
        let new = columns.into_iter().chain(parity);
        let mut each = vec![Bytes::new(); layout.width()];
        let local = old.is_none();
        match old {
            None => {
                for (position, chunk) in new.enumerate() {
                    each[layout.component(stripe, position)] = Bytes::from(chunk);
                }
            }
            Some(old) => {
                let old_parity = code(&old)?;
                let before = old.into_iter().chain(old_parity);
                for (position, (chunk, was)) in new.zip(before).enumerate() {
                    let mut both = Vec::with_capacity(chunk.len() * 2);
                    both.extend_from_slice(&chunk);
                    both.extend_from_slice(&was);
                    each[layout.component(stripe, position)] = Bytes::from(both);
                }
            }
        }
        self.fenced().await;
        let _permit = self.inflight.acquire().await.map_err(|_| ObjectError::Unavailable)?;
        self.submit(Op::Write { first: row, count: rows }, Payload::Each { pieces: Arc::new(each), local })
            .await
            .map_err(|_| ObjectError::Unavailable)??;
        Ok(())
    }

    /// Rows `row..row + rows` of stripe `stripe` at the positions `wanted`
    /// (data `0..k`, parity `k..k+m`), in slots by position: read from
    /// their components where those are active, rebuilt from the other
    /// positions where not (away, failing, or a checksum error). The caller
    /// holds the stripe, unless every wanted position is active and reads.
    async fn read_rows(
        self: &Arc<Self>,
        layout: Layout,
        stripe: u64,
        row: u64,
        rows: u64,
        wanted: &[usize],
    ) -> Result<Vec<Option<Vec<u8>>>, ObjectError> {
        let statuses = self.statuses();
        let active = |position: usize| statuses[layout.component(stripe, position)] == Status::Active;
        let mut slots: Vec<Option<Vec<u8>>> = vec![None; layout.width()];
        let mut tried = vec![false; layout.width()];
        let mut errors = Misses::default();
        let direct: Vec<usize> = wanted.iter().copied().filter(|position| active(*position)).collect();
        self.read_positions(layout, stripe, row, rows, &direct, &mut slots, &mut tried, &mut errors).await?;
        if wanted.iter().all(|position| slots[*position].is_some()) {
            return Ok(slots);
        }
        let others: Vec<usize> =
            (0..layout.width()).filter(|position| !tried[*position] && active(*position)).collect();
        self.read_positions(layout, stripe, row, rows, &others, &mut slots, &mut tried, &mut errors).await?;
        let have = slots.iter().filter(|slot| slot.is_some()).count();
        if have < layout.data {
            // Every chunk that failed went unanswered (its host is gone and
            // the owner has not marked it away yet), and the rest are not
            // active: the stripe is unavailable for now, as once the owner
            // has marked them.
            if errors.all_unanswered() {
                return Err(ObjectError::Unavailable);
            }
            return Err(ObjectError::Read(format!(
                "stripe {stripe}: {have} of {} chunks readable, {} needed ({})",
                layout.width(),
                layout.data,
                errors.messages.join("; ")
            )));
        }
        // Exactly k pieces suffice; more than k but fewer than k + m is
        // fine too.
        layout.reconstruct(&mut slots).map_err(|error| ObjectError::Read(format!("stripe {stripe}: {error}")))?;
        metrics::counter!("objects_erasure_rebuilt_reads_total").increment(1);
        Ok(slots)
    }

    /// Reads `positions` into their slots. A component that refuses this
    /// owner's epoch means a newer owner holds the object: this one closes
    /// and says so (the caller's I/O then goes to the new owner).
    #[allow(clippy::too_many_arguments)]
    async fn read_positions(
        self: &Arc<Self>,
        layout: Layout,
        stripe: u64,
        row: u64,
        rows: u64,
        positions: &[usize],
        slots: &mut [Option<Vec<u8>>],
        tried: &mut [bool],
        errors: &mut Misses,
    ) -> Result<(), ObjectError> {
        let reads = positions.iter().map(|&position| {
            let component = layout.component(stripe, position);
            let client = self.client(component);
            let id = self.ids[component];
            async move { (position, client.read(self.epoch, id, row, rows).await) }
        });
        for (position, read) in futures::future::join_all(reads).await {
            tried[position] = true;
            match read {
                Ok(data) => slots[position] = Some(data.to_vec()),
                Err(error) if self.deposed_by(&error) => return Err(ObjectError::Deposed),
                Err(error) => {
                    let component = layout.component(stripe, position);
                    tracing::warn!(component, stripe, %error, "chunk unreadable; rebuilding it from the others");
                    errors.push(format!("component {component}: {error}"), &error);
                }
            }
        }
        Ok(())
    }

    /// Reads whole object blocks: each chunk piece from its component, or
    /// rebuilt from the rest of its stripe.
    /// `via`: the calling thread's transport, for the chunk reads (see
    /// [`Object::read_at_via`]).
    pub(super) async fn read_erasure(
        self: &Arc<Self>,
        layout: Layout,
        first: u64,
        count: u64,
        via: Option<&T>,
    ) -> Result<Bytes, ObjectError> {
        // The block cache as for copies (see `read_at_via`): a write marks
        // the data blocks of the rows it changes, so a fill is checked
        // against every write that could touch what it read.
        if let Some(data) = self.cache.as_ref().and_then(|cache| cache.lookup(first, count)) {
            return Ok(data);
        }
        // Fewer than k active: a chunk read straight from an active
        // component could hold a write that was refused and is rolled back
        // when k are back (a read must not see a write that then vanishes).
        if self.active_count() < layout.data {
            return Err(ObjectError::Unavailable);
        }
        let ticket = self.cache.as_ref().and_then(|cache| cache.ticket(first, count));
        let sent = self.lease.now();
        let pieces = layout.pieces(first, count);
        let parts = first_error(
            futures::future::join_all(pieces.into_iter().map(|piece| self.read_piece(layout, piece, via))).await,
        )?;
        let data = match <[Bytes; 1]>::try_from(parts) {
            Ok([part]) => part,
            Err(parts) => {
                let mut out = BytesMut::with_capacity(ec::bytes(count));
                for part in parts {
                    out.extend_from_slice(&part);
                }
                out.freeze()
            }
        };
        if let Some(cache) = &self.cache {
            // Every piece came from active components (read, or rebuilt
            // from others read).
            cache.answered(sent);
            if let Some(ticket) = &ticket {
                cache.fill(ticket, first, &data);
            }
        }
        Ok(data)
    }

    async fn read_piece(self: &Arc<Self>, layout: Layout, piece: Piece, via: Option<&T>) -> Result<Bytes, ObjectError> {
        if self.statuses()[piece.component] == Status::Active {
            let mut client = self.client(piece.component);
            if let Some(transport) = via {
                client = client.with_transport(transport.clone());
            }
            match client.read(self.epoch, self.ids[piece.component], piece.row, piece.count).await {
                Ok(data) => return Ok(data),
                Err(error) if self.deposed_by(&error) => return Err(ObjectError::Deposed),
                Err(error) => tracing::warn!(component = piece.component, %error, "chunk unreadable; rebuilding it"),
            }
        }
        // Rebuilt from the other chunks as no write to the stripe is
        // half done.
        let _stripe = self.stripe_lock(piece.stripe).lock().await;
        let mut slots = self.read_rows(layout, piece.stripe, piece.row, piece.count, &[piece.position]).await?;
        Ok(Bytes::from(slots[piece.position].take().expect("rebuilt")))
    }

    /// Deallocates object blocks: the stripes the range covers whole are
    /// reclaimed on every component, data and parity chunks alike (rows
    /// of zeros have zero parity); the parts of stripes it covers in part
    /// are written with zeros, parity updated.
    pub(super) async fn unmap_erasure(
        self: &Arc<Self>,
        layout: Layout,
        first: u64,
        count: u64,
    ) -> Result<(), ObjectError> {
        let stripe_blocks = layout.stripe_blocks();
        let end = first + count;
        let from = first.div_ceil(stripe_blocks);
        // The last stripe may run past the object's end: past it nothing
        // is stored, so a range to the end covers it whole.
        let to = if end == self.blocks { self.blocks.div_ceil(stripe_blocks) } else { end / stripe_blocks };
        let mut zero = Vec::new();
        if from < to {
            if first < from * stripe_blocks {
                zero.push((first, from * stripe_blocks - first));
            }
            if to * stripe_blocks < end {
                zero.push((to * stripe_blocks, end - to * stripe_blocks));
            }
            let mut slots: Vec<usize> =
                (from..to).take(STRIPE_LOCKS).map(|stripe| (stripe % STRIPE_LOCKS as u64) as usize).collect();
            slots.sort_unstable();
            slots.dedup();
            // In ascending order: a write holds one stripe lock at a time.
            let mut held = Vec::with_capacity(slots.len());
            for slot in slots {
                held.push(self.stripes[slot].lock().await);
            }
            self.fenced().await;
            let _permit = self.inflight.acquire().await.map_err(|_| ObjectError::Unavailable)?;
            let rows = Op::Unmap { first: from * layout.chunk_blocks, count: (to - from) * layout.chunk_blocks };
            self.submit(rows, Payload::none()).await.map_err(|_| ObjectError::Unavailable)??;
            metrics::counter!("objects_erasure_stripes_reclaimed_total").increment(to - from);
        } else {
            zero.push((first, count));
        }
        for (block, count) in zero {
            self.write_erasure(layout, block, Bytes::from(vec![0u8; ec::bytes(count)])).await?;
        }
        Ok(())
    }

    /// Whether the object block `first` is allocated, and how many blocks
    /// from it (within its chunk, up to `count`) share that: as its data
    /// chunk's component says (another active one holds the same rows
    /// allocated or not, unless the stripe was written in part).
    pub(super) async fn provisioning_erasure(
        self: &Arc<Self>,
        layout: Layout,
        first: u64,
        count: u64,
    ) -> Result<(bool, u64), ObjectError> {
        let piece = layout.pieces(first, count.min(layout.chunk_blocks))[0];
        let mut order = vec![piece.component];
        order.extend(self.active().into_iter().filter(|component| *component != piece.component));
        let statuses = self.statuses();
        let mut errors = Misses::default();
        for component in order {
            if statuses[component] != Status::Active {
                continue;
            }
            match self.client(component).provisioning(self.epoch, self.ids[component], piece.row, piece.count).await {
                Ok((mapped, rows)) => return Ok((mapped, rows.min(piece.count) * BLOCK_SIZE as u64)),
                Err(error) => errors.push(error.to_string(), &error),
            }
        }
        Err(errors.into_error())
    }

    /// A resync step of `plan`: rebuilds `target`'s chunks at rows
    /// `row..row + rows` (in one stripe) from the other components and
    /// sends them to it.
    pub(super) async fn resync_rows(
        self: &Arc<Self>,
        layout: Layout,
        target: Index,
        plan: u64,
        row: u64,
        rows: u64,
    ) -> Result<u64, ()> {
        let stripe = layout.stripe_of_row(row);
        let position = layout.position(stripe, target);
        let sent = {
            // Held until the copy is sent: a write to the stripe sent
            // before reaches the target first (and the copy then skips the
            // rows it wrote); one sent after reads nothing half done.
            let _stripe = self.stripe_lock(stripe).lock().await;
            let mut slots = self.read_rows(layout, stripe, row, rows, &[position]).await.map_err(|_| ())?;
            let data = Bytes::from(slots[position].take().expect("rebuilt"));
            let mut state = self.state.lock().expect("object lock");
            if !state.owner.resyncing_under(target, plan) {
                return Err(()); // active, or planned again (see `Object::resync`)
            }
            // Rebuilt rows have no before-image: it can no longer be
            // readmitted as it stands (see `Object::readmit`).
            self.rows_rebuilt.lock().expect("rebuilt lock").insert(target);
            self.sent_by_resync(target, row, rows);
            let request = Request::SyncWrite { component: self.ids[target], plan, first: row };
            self.send(&mut state, target, request, data, None)
        };
        match sent.await {
            Ok(Ok(_)) => Ok(rows),
            _ => Err(()),
        }
    }

    /// Completes chunk unmaps a rolled-back component had above the LSN
    /// rolled back to (whole stripes' rows): they are unmapped on every
    /// component, under new LSNs.
    pub(super) async fn complete_unmaps(self: &Arc<Self>, ranges: Vec<(u64, u64)>) -> Result<(), ObjectError> {
        for (first, count) in ranges {
            let _permit = self.inflight.acquire().await.map_err(|_| ObjectError::Unavailable)?;
            self.submit(Op::Unmap { first, count }, Payload::none()).await.map_err(|_| ObjectError::Unavailable)??;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_over_stripes_fails_with_the_error_that_decides_its_fate_whichever_came_first() {
        let read = || ObjectError::Read("a checksum mismatch".into());
        let ok = || Ok(Bytes::from_static(b"rows"));
        assert_eq!(first_error(vec![ok(), ok()]).unwrap().len(), 2);
        let answered = first_error(vec![Err(ObjectError::Unavailable), ok(), Err(read())]);
        assert!(matches!(answered, Err(ObjectError::Read(_))), "{answered:?}");
        let answered = first_error(vec![Err(read()), Err(ObjectError::Unavailable)]);
        assert!(matches!(answered, Err(ObjectError::Read(_))), "{answered:?}");
        let deposed = first_error(vec![Err(read()), Err(ObjectError::Unavailable), Err(ObjectError::Deposed)]);
        assert!(matches!(deposed, Err(ObjectError::Deposed)), "{deposed:?}");
        let held = first_error(vec![ok(), Err(ObjectError::Unavailable)]);
        assert!(matches!(held, Err(ObjectError::Unavailable)), "{held:?}");
    }
}
