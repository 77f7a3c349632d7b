//! Sample batches over MQTT for the incremental-learning job (`[incremental.mqtt]`): the edge
//! subscribes with QoS 1 in a persistent session (clean session off, a fixed client id) and
//! acknowledges a message only once its batch is stored or refused for good, so the broker sends
//! again what the edge had not stored - while it was down, or when it stopped half-way. A batch
//! whose content was taken in already (a redelivery) is acknowledged and not taken twice.
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};

use super::error::is_bad_request;
use super::incremental::{IncrementalJob, Taken};
use super::replay::ReplayBuffer;

/// Keeps the subscription up until the process ends (reconnecting every second while the broker
/// is away) and takes in every message.
pub async fn subscribe(job: Arc<IncrementalJob>, replay: Arc<ReplayBuffer>) {
    let Some((cfg, target)) = job.mqtt() else { return };
    let mut options = MqttOptions::new(target.client_id.clone(), target.host.clone(), target.port);
    let max = cfg.max_message_mib.max(1) << 20;
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(max, max);
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_env {
            // Checked at load; an unset variable now means an empty password.
            Some(var) => std::env::var(var).unwrap_or_default(),
            None => cfg.password.clone().unwrap_or_default(),
        };
        options.set_credentials(user.clone(), password);
    }
    if let Some(tls) = &target.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
    }
    let broker = format!("{}:{}", target.host, target.port);
    let (client, mut events) = AsyncClient::new(options, 64);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Again on every connection: a broker that lost the session lost the subscription.
                if let Err(e) = client.subscribe(cfg.topic.clone(), QoS::AtLeastOnce).await {
                    tracing::warn!(%broker, "MQTT: subscribing to {}: {e}", cfg.topic);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure));
                let state = if refused {
                    tracing::warn!(%broker, topic = %cfg.topic, "MQTT: the broker refused the subscription");
                    format!("the broker {broker} refused the subscription to {}", cfg.topic)
                } else {
                    tracing::info!(%broker, topic = %cfg.topic, "MQTT: subscribed");
                    format!("subscribed to {} at {broker}", cfg.topic)
                };
                job.note_mqtt(Some(state), None);
            }
            Ok(Event::Incoming(Packet::Publish(message))) => {
                take(&job, &replay, &message.topic, message.payload.to_vec()).await;
                if let Err(e) = client.ack(&message).await {
                    tracing::warn!(%broker, "MQTT: acknowledging a message: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%broker, "MQTT: {e}; connecting again in a second");
                job.note_mqtt(Some(format!("not connected to {broker}: {e}")), None);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Takes in one message's batch; an error of the moment is tried again (a second apart) until
/// the batch is stored or refused for good.
async fn take(job: &Arc<IncrementalJob>, replay: &Arc<ReplayBuffer>, topic: &str, payload: Vec<u8>) {
    let payload = Arc::new(payload);
    loop {
        let (j, r, p, name) = (job.clone(), replay.clone(), payload.clone(), format!("mqtt:{topic}"));
        let taken = tokio::task::spawn_blocking(move || j.take_in(&r, &p, &name))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("taking in a batch: {e}")));
        match taken {
            Ok(Taken::New(report)) => {
                tracing::info!(%topic, kept = report.kept, offered = report.offered, "MQTT: batch taken in");
                job.note_mqtt(None, Some(true));
            }
            Ok(Taken::Duplicate) => tracing::info!(%topic, "MQTT: a batch taken in before, sent again: skipped"),
            Err(e) if is_bad_request(&e) => {
                tracing::warn!(%topic, "MQTT: batch refused: {e:#}");
                job.note_mqtt(None, Some(false));
            }
            Err(e) => {
                tracing::warn!(%topic, "MQTT: batch not taken in yet, trying again: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        return;
    }
}
