-- Entries as the ledger shows them, without rewriting every row at the freeze and the draw
-- (docs/performance.md, "Freeze and draw at scale"). From this migration on:
--   * the freeze writes `weight` only where it is above 1 (loss weighting); an entry of the frozen
--     list keeps weight NULL and reads as 1 here;
--   * the draw no longer writes `not-drawn`: a registered entry of a drawn round that pass 0 did
--     not place reads as not-drawn here (a later pass may still place it: then the stream makes it
--     `won`, or it stays not-drawn, as the draw's UPDATE used to leave it).
-- Rows written before keep their stored `not-drawn` and `weight = 1`; the view passes them on.
-- An entry is in the frozen list (entries.csv) when it was registered and not barred at the
-- freeze: from then on it is registered, won, not-drawn, or excluded by award.lua (placed, then
-- refused for a cooldown: it has a draw_awards row); an entry excluded at the freeze has none.
-- The columns are listed one by one: a migration adding a column to entries recreates the view.
CREATE VIEW entries_shown AS
SELECT e.entry_id, e.round_id, e.receipt, e.site_id, e.accept_district,
       CASE WHEN e.status = 'registered' AND d.drawn_at IS NOT NULL
                 AND a.pass IS DISTINCT FROM 0 THEN 'not-drawn'
            ELSE e.status END AS status,
       coalesce(e.weight, CASE WHEN d.frozen_at IS NOT NULL
                                AND (e.status IN ('registered', 'won', 'not-drawn')
                                     OR (e.status = 'excluded' AND a.entry_id IS NOT NULL))
                               THEN 1 END) AS weight,
       e.citizen_hash, e.phone_hash, e.citizen_id_masked, e.reservation_id, e.seq,
       e.created_at, e.updated_at, e.recorded_at, e.channel, e.age_band
  FROM entries e
  LEFT JOIN draws d ON d.round_id = e.round_id
  LEFT JOIN draw_awards a ON a.round_id = e.round_id AND a.entry_id = e.entry_id;
