//! Storing what devices send: each message applied once, in one transaction with its id
//! (cells with their pictures, reviews, slide reports, model events), device statuses, and
//! the topics and reasons of refused messages.

use super::{Applied, Db, now};
use crate::sql::Conn;
use anyhow::Result;
use wbc_protocol::uplink::{Body, CellMessage, DeviceState, Envelope, ModelEvent, Status, clean_text};

/// A picture (a cell's, or a reviewed cell's) when it is one central keeps: valid base64,
/// within [`MAX_PICTURE_BYTES`](wbc_protocol::uplink::MAX_PICTURE_BYTES), and a JPEG that
/// decodes to at most 512 pixels across. Anything else is dropped (the message is kept
/// without it).
fn valid_picture(jpeg: Option<Vec<u8>>, field: &str, index: u32) -> Option<Vec<u8>> {
    let jpeg = jpeg?;
    let limits = wbc_cells::image::DecodeLimits {
        max_bytes: wbc_protocol::uplink::MAX_PICTURE_BYTES as u64,
        max_side: 512,
        max_alloc: 4 << 20,
    };
    match wbc_cells::image::decode_rgb(&jpeg, &limits) {
        Ok(_) => Some(jpeg),
        Err(e) => {
            tracing::warn!(error = %e, field, index, "dropping a picture that does not decode");
            None
        }
    }
}

impl Db {
    fn touch_device(c: &mut Conn, clinic: &str, device: &str) -> Result<()> {
        c.exec(
            "INSERT INTO devices (clinic, device, state, at, last_seen) VALUES ($1, $2, 'unknown', 0, $3)
             ON CONFLICT (clinic, device) DO UPDATE SET last_seen = excluded.last_seen",
            &[clinic.into(), device.into(), now().into()],
        )?;
        Ok(())
    }

    /// Applies a validated message once.
    pub fn apply(&self, e: &Envelope) -> Result<Applied> {
        let mut conn = self.conn.lock();
        conn.transaction(|c| {
            let fresh = c.exec(
                "INSERT INTO messages (id, clinic, device, seq, kind, sent_at, received_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                &[
                    (&e.id).into(),
                    (&e.clinic).into(),
                    (&e.device).into(),
                    e.seq.into(),
                    e.body.kind().as_str().into(),
                    e.at.into(),
                    now().into(),
                ],
            )?;
            if fresh == 0 {
                return Ok(Applied::Duplicate);
            }
            Self::touch_device(c, &e.clinic, &e.device)?;
            match &e.body {
                Body::Cell(m) => {
                    c.exec(
                        "INSERT INTO cells (clinic, device, field_id, idx, slide_id, received_at, class, field_json,
                                            cell_json, message_id)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET
                           slide_id = excluded.slide_id, class = excluded.class, field_json = excluded.field_json,
                           cell_json = excluded.cell_json, message_id = excluded.message_id",
                        &[
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&m.field.id).into(),
                            m.index.into(),
                            (&m.field.slide_id).into(),
                            m.field.received_at.into(),
                            m.cell.result.class_name().into(),
                            serde_json::to_string(&m.field)?.into(),
                            serde_json::to_string(&m.cell)?.into(),
                            (&e.id).into(),
                        ],
                    )?;
                    Self::mark_slide(c, &e.clinic, &e.device, &m.field.slide_id)?;
                    let key = [
                        (&e.clinic).into(),
                        (&e.device).into(),
                        (&m.field.id).into(),
                        m.index.into(),
                    ];
                    match valid_picture(m.picture_jpeg(), &m.field.id, m.index) {
                        Some(jpeg) => c.exec(
                            "INSERT INTO cell_pictures (clinic, device, field_id, idx, jpeg_base64)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET jpeg_base64 = excluded.jpeg_base64",
                            &[key.as_slice(), &[CellMessage::encode_picture(&jpeg).into()]].concat(),
                        )?,
                        // A cell sent anew without a (usable) picture keeps none of an old one.
                        None => c.exec(
                            "DELETE FROM cell_pictures WHERE clinic = $1 AND device = $2 AND field_id = $3 AND idx = $4",
                            &key,
                        )?,
                    };
                }
                Body::Review(r) => {
                    c.exec(
                        "INSERT INTO reviews (clinic, device, field_id, idx, review_json, at) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET
                           review_json = excluded.review_json, at = excluded.at WHERE excluded.at >= reviews.at",
                        &[
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&r.field_id).into(),
                            r.index.into(),
                            serde_json::to_string(&r.review)?.into(),
                            r.review.at.into(),
                        ],
                    )?;
                    // What the technician saw, kept for the clinic's teaching
                    // (`central export-reviews`); a review without one keeps an earlier one.
                    if let Some(jpeg) = valid_picture(r.picture_jpeg(), &r.field_id, r.index) {
                        c.exec(
                            "INSERT INTO review_pictures (clinic, device, field_id, idx, jpeg_base64)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (clinic, device, field_id, idx) DO UPDATE SET jpeg_base64 = excluded.jpeg_base64",
                            &[
                                (&e.clinic).into(),
                                (&e.device).into(),
                                (&r.field_id).into(),
                                r.index.into(),
                                CellMessage::encode_picture(&jpeg).into(),
                            ],
                        )?;
                    }
                    Self::mark_slide(c, &e.clinic, &e.device, &r.slide_id)?;
                }
                Body::Slide(m) => {
                    c.exec(
                        "INSERT INTO slides (clinic, device, slide_id, started_at, finished_at, report_json)
                         VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (clinic, device, slide_id) DO UPDATE SET
                           started_at = excluded.started_at,
                           finished_at = COALESCE(excluded.finished_at, slides.finished_at),
                           report_json = excluded.report_json",
                        &[
                            (&e.clinic).into(),
                            (&e.device).into(),
                            (&m.report.slide_id).into(),
                            m.started_at.into(),
                            m.finished_at.into(),
                            serde_json::to_string(&m.report)?.into(),
                        ],
                    )?;
                    Self::mark_slide(c, &e.clinic, &e.device, &m.report.slide_id)?;
                }
                Body::Model(m) => {
                    c.exec(
                        "INSERT INTO model_events (message_id, clinic, device, event, model_version, detail, at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (message_id) DO NOTHING",
                        &[
                            (&e.id).into(),
                            (&e.clinic).into(),
                            (&e.device).into(),
                            m.event.as_str().into(),
                            m.model_version.into(),
                            (&m.detail).into(),
                            e.at.into(),
                        ],
                    )?;
                    if m.event == ModelEvent::Active {
                        c.exec(
                            "UPDATE devices SET model_version = $1 WHERE clinic = $2 AND device = $3",
                            &[m.model_version.into(), (&e.clinic).into(), (&e.device).into()],
                        )?;
                    }
                }
            }
            Ok(Applied::New)
        })
    }

    /// Records a device's status. The last one to arrive wins: the broker delivers a device's
    /// messages in order and publishes its last will after them (the will's `at` is when the
    /// connection began, so times cannot be compared).
    pub fn set_status(&self, s: &Status) -> Result<()> {
        let mut conn = self.conn.lock();
        conn.transaction(|c| {
            Self::touch_device(c, &s.clinic, &s.device)?;
            let state = match s.state {
                DeviceState::Online => "online",
                DeviceState::Offline => "offline",
            };
            c.exec(
                "UPDATE devices SET state = $1, at = $2, backlog = COALESCE($3, backlog),
                        model_version = COALESCE($4, model_version)
                 WHERE clinic = $5 AND device = $6",
                &[
                    state.into(),
                    s.at.into(),
                    s.backlog.into(),
                    s.model_version.into(),
                    (&s.clinic).into(),
                    (&s.device).into(),
                ],
            )?;
            Ok(())
        })
    }

    /// Keeps a refused message's topic and reason (for the lab to see what devices send wrong).
    pub fn note_rejected(&self, topic: &str, reason: &str) -> Result<()> {
        let mut conn = self.conn.lock();
        conn.exec(
            "INSERT INTO rejected (topic, reason, at) VALUES ($1, $2, $3)",
            &[
                clean_text(topic).chars().take(300).collect::<String>().into(),
                clean_text(reason).chars().take(500).collect::<String>().into(),
                now().into(),
            ],
        )?;
        Ok(())
    }
}
