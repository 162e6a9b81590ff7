//! Discovery that heals, against real etcd: a server replaced by an empty one
//! (every lease and key gone), and a 3-member cluster that loses its leader and
//! has a member replaced with an empty data directory. Registrations must come
//! back by themselves and watches must report them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kvrouter_runtime::discovery::{Discovery, DiscoveryEvent, EtcdDiscovery, Watch};
use kvrouter_runtime::endpoint::{EndpointId, Instance};
use kvrouter_runtime::testing::{EtcdCluster, EtcdServer};

const TTL: Duration = Duration::from_secs(3);

fn instance(id: u64, ep: &EndpointId) -> Instance {
    Instance {
        id,
        endpoint: ep.clone(),
        address: format!("tcp://127.0.0.1:{}", 1000 + id),
        metadata: serde_json::json!({"block_size": 16}),
    }
}

/// Follows `watch` until the instances it reports are exactly `want`.
async fn until_watch_shows(
    watch: &mut Watch,
    seen: &mut BTreeSet<u64>,
    want: &[u64],
    within: Duration,
) {
    let want: BTreeSet<u64> = want.iter().copied().collect();
    let end = Instant::now() + within;
    while *seen != want {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Ok(Some(DiscoveryEvent::Added(i))) => {
                seen.insert(i.id);
            }
            Ok(Some(DiscoveryEvent::Removed(id))) => {
                seen.remove(&id);
            }
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("after {within:?} the watch shows {seen:?}, not {want:?}"),
        }
    }
}

async fn listed(store: &EtcdDiscovery, ep: &EndpointId) -> BTreeSet<u64> {
    store
        .list(ep)
        .await
        .map(|v| v.iter().map(|i| i.id).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_come_back_when_etcd_is_replaced_by_an_empty_server() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut server = EtcdServer::start().expect("etcd (make deps installs it)");
    let ep: EndpointId = "ns.backend.generate".parse().unwrap();
    let worker = EtcdDiscovery::connect(&[server.endpoint()]).await.unwrap();
    let router = EtcdDiscovery::connect(&[server.endpoint()]).await.unwrap();
    let _r1 = worker.register(instance(1, &ep), TTL).await.unwrap();
    let _r2 = worker.register(instance(2, &ep), TTL).await.unwrap();
    let mut watch = router.watch(&ep).await.unwrap();
    let mut seen = BTreeSet::new();
    until_watch_shows(&mut watch, &mut seen, &[1, 2], Duration::from_secs(5)).await;

    let t0 = Instant::now();
    server.replace().expect("an empty etcd on the same ports");
    // Within a keep-alive round or two the leases are found gone and replaced.
    until_watch_shows(&mut watch, &mut seen, &[1, 2], Duration::from_secs(15)).await;
    let end = Instant::now() + Duration::from_secs(15);
    while listed(&router, &ep).await != BTreeSet::from([1, 2]) {
        assert!(
            Instant::now() < end,
            "etcd never listed both instances again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "registrations back {:?} after the replacement",
        t0.elapsed()
    );
    // And they stay: the new leases are kept alive past their TTL.
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(listed(&router, &ep).await, BTreeSet::from([1, 2]));
    // The watch goes on reporting new changes.
    let _r3 = worker.register(instance(3, &ep), TTL).await.unwrap();
    until_watch_shows(&mut watch, &mut seen, &[1, 2, 3], Duration::from_secs(10)).await;
}

/// Which member of `cluster` leads, if one does.
async fn leader_of(cluster: &EtcdCluster) -> Option<usize> {
    let mut ids = Vec::new();
    let mut leader_id = 0;
    for ep in cluster.endpoints() {
        let Ok(mut c) = etcd_client::Client::connect([ep], None).await else {
            return None;
        };
        let Ok(s) = c.status().await else {
            return None;
        };
        ids.push(s.header().map_or(0, |h| h.member_id()));
        leader_id = leader_id.max(s.leader());
    }
    ids.iter().position(|&id| id == leader_id && id != 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_survives_a_killed_leader_and_a_replaced_member() {
    let mut cluster = EtcdCluster::start(3).expect("etcd (make deps installs it)");
    let eps = cluster.endpoints();
    let ep: EndpointId = "ns.backend.generate".parse().unwrap();
    let worker = EtcdDiscovery::connect(&eps).await.unwrap();
    let router = EtcdDiscovery::connect(&eps).await.unwrap();
    // The cluster answers once it has elected a leader.
    let end = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        if let Some(l) = leader_of(&cluster).await {
            break l;
        }
        assert!(Instant::now() < end, "no leader elected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _r1 = worker.register(instance(1, &ep), TTL).await.unwrap();
    let mut watch = router.watch(&ep).await.unwrap();
    let mut seen = BTreeSet::new();
    until_watch_shows(&mut watch, &mut seen, &[1], Duration::from_secs(5)).await;

    // The leader dies: the two others elect a new one; the lease lives on.
    cluster.kill(leader);
    tokio::time::sleep(TTL * 2).await;
    let r2 = async {
        loop {
            match worker.register(instance(2, &ep), TTL).await {
                Ok(r) => return r,
                // The client may first try the dead member's connection.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    };
    let _r2 = tokio::time::timeout(Duration::from_secs(10), r2)
        .await
        .expect("registering with a member down");
    until_watch_shows(&mut watch, &mut seen, &[1, 2], Duration::from_secs(10)).await;

    // The dead member is replaced by an empty one, etcd's way: remove, add, join.
    let live = (0..3).find(|&i| i != leader).unwrap();
    let mut admin = etcd_client::Client::connect([eps[live].clone()], None)
        .await
        .unwrap();
    let ids = member_ids(&cluster, leader).await;
    admin.member_remove(ids[leader]).await.unwrap();
    admin
        .member_add([cluster.members[leader].peer.clone()], None)
        .await
        .unwrap();
    cluster
        .start_replacement(leader)
        .expect("the replacement starts");
    // Now a survivor dies too: the quorum needs the replacement, so it must
    // hold the data it synced from the cluster.
    let survivor = (0..3).find(|&i| i != leader && i != live).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(survivor);
    let end = Instant::now() + Duration::from_secs(20);
    while listed(&router, &ep).await != BTreeSet::from([1, 2]) {
        assert!(
            Instant::now() < end,
            "the cluster with its replaced member lost the registrations"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past two TTLs the registrations are still (or, if an election outlasted
    // a lease, again) there: the keepers renew or replace their leases.
    tokio::time::sleep(TTL * 2).await;
    let end = Instant::now() + Duration::from_secs(10);
    while listed(&router, &ep).await != BTreeSet::from([1, 2]) {
        assert!(
            Instant::now() < end,
            "registrations lost after the failover"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_watch_shows(&mut watch, &mut seen, &[1, 2], Duration::from_secs(10)).await;
}

/// Every member's etcd id, asking only the members still running.
async fn member_ids(cluster: &EtcdCluster, dead: usize) -> Vec<u64> {
    let eps = cluster.endpoints();
    let mut c = etcd_client::Client::connect(
        eps.iter()
            .enumerate()
            .filter(|(i, _)| *i != dead)
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>(),
        None,
    )
    .await
    .unwrap();
    let members = c.member_list().await.unwrap();
    cluster
        .members
        .iter()
        .map(|m| {
            members
                .members()
                .iter()
                .find(|x| x.peer_urls().contains(&m.peer))
                .map_or(0, |x| x.id())
        })
        .collect()
}
