//! Table tests for every branch of [`place`].

use super::*;

const GI: u64 = 1 << 30;
const MI: u64 = 1 << 20;

fn node(name: &str, vcpus: u64, mem_gi: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        vcpus,
        memory: mem_gi * GI,
        agent_ready: true,
        ..NodeInfo::default()
    }
}

fn req(vcpus: u64, mem_mi: u64) -> Request {
    Request {
        vcpus,
        memory: mem_mi * MI,
        ..Request::default()
    }
}

fn bound(node: &str, vcpus: u64, mem_mi: u64) -> Bound {
    Bound {
        node: node.into(),
        vcpus,
        memory: mem_mi * MI,
        tenant: None,
        group: None,
    }
}

fn tenant(name: &str, isolation: NodeIsolation) -> Option<TenantRef> {
    Some(TenantRef {
        name: name.into(),
        isolation,
    })
}

#[test]
fn picks_the_node_with_most_free_memory() {
    let nodes = [node("a", 8, 4), node("b", 8, 8), node("c", 8, 2)];
    assert_eq!(place(&req(1, 512), &nodes, &[]).unwrap(), "b");
    // Once b is fuller than a (as a fraction), a wins.
    let used = [bound("b", 1, 7 * 1024)];
    assert_eq!(place(&req(1, 512), &nodes, &used).unwrap(), "a");
}

#[test]
fn ties_break_by_name() {
    let nodes = [node("b", 4, 4), node("a", 4, 4)];
    assert_eq!(place(&req(1, 128), &nodes, &[]).unwrap(), "a");
}

#[test]
fn capacity_is_never_overcommitted() {
    let nodes = [node("a", 2, 1)];
    let used = [bound("a", 1, 768)];
    let err = place(&req(1, 512), &nodes, &used).unwrap_err();
    assert_eq!(err.reasons.get(&Reject::Memory), Some(&1));
    let used = [bound("a", 2, 0)];
    let err = place(&req(1, 64), &nodes, &used).unwrap_err();
    assert_eq!(err.reasons.get(&Reject::Cpu), Some(&1));
    // Exactly full fits.
    let used = [bound("a", 1, 512)];
    assert_eq!(place(&req(1, 512), &nodes, &used).unwrap(), "a");
}

#[test]
fn each_rejection_reason() {
    let mut not_ready = node("n1", 8, 8);
    not_ready.agent_ready = false;
    let mut fenced = node("n2", 8, 8);
    fenced.fenced = true;
    let mut cordoned = node("n3", 8, 8);
    cordoned.cordoned = true;
    let mut tainted = node("n4", 8, 8);
    tainted.taints.push(Taint {
        key: "dedicated".into(),
        value: Some("db".into()),
        effect: "NoSchedule".into(),
        ..Taint::default()
    });
    let unlabelled = node("n5", 8, 8);
    let mut r = req(1, 128);
    r.node_selector.insert("zone".into(), "a".into());
    let nodes = [not_ready, fenced, cordoned, tainted, unlabelled];
    let err = place(&r, &nodes, &[]).unwrap_err();
    // The first failing check counts: the tainted node also lacks the label.
    assert_eq!(
        err.reasons.into_iter().collect::<Vec<_>>(),
        [
            (Reject::AgentNotReady, 1),
            (Reject::Fenced, 1),
            (Reject::Cordoned, 1),
            (Reject::NodeSelector, 2),
        ]
    );
}

#[test]
fn taints_and_tolerations() {
    let mut tainted = node("t", 8, 8);
    tainted.taints.push(Taint {
        key: "dedicated".into(),
        effect: "NoSchedule".into(),
        ..Taint::default()
    });
    let nodes = [tainted];
    let err = place(&req(1, 128), &nodes, &[]).unwrap_err();
    assert_eq!(err.reasons.get(&Reject::Taint), Some(&1));
    let mut r = req(1, 128);
    r.tolerations.push(Toleration {
        key: Some("dedicated".into()),
        operator: Some("Exists".into()),
        ..Toleration::default()
    });
    assert_eq!(place(&r, &nodes, &[]).unwrap(), "t");
}

#[test]
fn node_selector_matches_labels() {
    let mut labelled = node("l", 8, 8);
    labelled.labels.insert("zone".into(), "a".into());
    let nodes = [node("x", 8, 64), labelled];
    let mut r = req(1, 128);
    r.node_selector.insert("zone".into(), "a".into());
    assert_eq!(place(&r, &nodes, &[]).unwrap(), "l");
}

#[test]
fn replicas_of_one_owner_spread() {
    let nodes = [node("a", 8, 8), node("b", 8, 8), node("c", 8, 8)];
    let mut r = req(1, 128);
    r.group = Some("swl-uid".into());
    let mut used = Vec::new();
    let mut chosen = Vec::new();
    for _ in 0..3 {
        let n = place(&r, &nodes, &used).unwrap();
        used.push(Bound {
            group: r.group.clone(),
            ..bound(&n, 1, 128)
        });
        chosen.push(n);
    }
    chosen.sort();
    assert_eq!(chosen, ["a", "b", "c"]);
    // A fourth doubles up somewhere rather than failing.
    assert!(place(&r, &nodes, &used).is_ok());
}

#[test]
fn spread_prefers_fewer_siblings_over_free_memory() {
    let nodes = [node("big", 8, 64), node("small", 8, 4)];
    let mut r = req(1, 128);
    r.group = Some("g".into());
    let used = [Bound {
        group: Some("g".into()),
        ..bound("big", 1, 128)
    }];
    assert_eq!(place(&r, &nodes, &used).unwrap(), "small");
}

#[test]
fn exclusive_tenant_avoids_other_tenants_and_keeps_them_out() {
    let nodes = [node("a", 8, 8), node("b", 8, 8)];
    let shared_blue = Bound {
        tenant: tenant("blue", NodeIsolation::Shared),
        ..bound("a", 1, 128)
    };
    // An exclusive red VM cannot go beside blue.
    let mut red = req(1, 128);
    red.tenant = tenant("red", NodeIsolation::Exclusive);
    assert_eq!(
        place(&red, &nodes, std::slice::from_ref(&shared_blue)).unwrap(),
        "b"
    );
    // With red on b, nobody else may join b, and a VM of no tenant cannot either.
    let red_on_b = Bound {
        tenant: tenant("red", NodeIsolation::Exclusive),
        ..bound("b", 1, 128)
    };
    let used = [shared_blue.clone(), red_on_b.clone()];
    let mut green = req(1, 128);
    green.tenant = tenant("green", NodeIsolation::Shared);
    assert_eq!(place(&green, &nodes, &used).unwrap(), "a");
    assert_eq!(place(&req(1, 128), &nodes, &used).unwrap(), "a");
    // Red itself can join b.
    assert_eq!(place(&red, &nodes, &used).unwrap(), "b");
    // When every node is taken, the reason says so.
    let used = [
        Bound {
            tenant: tenant("blue", NodeIsolation::Shared),
            ..bound("b", 1, 128)
        },
        shared_blue,
    ];
    let err = place(&red, &nodes, &used).unwrap_err();
    assert_eq!(err.reasons.get(&Reject::Tenant), Some(&2));
    assert!(
        err.to_string().contains("2 run VMs of another tenant"),
        "{err}"
    );
}

#[test]
fn shared_tenants_mix() {
    let nodes = [node("a", 8, 8)];
    let used = [Bound {
        tenant: tenant("blue", NodeIsolation::Shared),
        ..bound("a", 1, 128)
    }];
    let mut green = req(1, 128);
    green.tenant = tenant("green", NodeIsolation::Shared);
    assert_eq!(place(&green, &nodes, &used).unwrap(), "a");
}

#[test]
fn unschedulable_message_names_what_is_missing() {
    let nodes = [node("a", 1, 1), node("b", 1, 1)];
    let err = place(&req(2, 512), &nodes, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "0/2 nodes can run it (2 vCPUs, 512 MiB): 2 have too few free vCPUs"
    );
    let err = place(&req(1, 128), &[], &[]).unwrap_err();
    assert!(
        err.to_string().starts_with("no node runs a runv agent"),
        "{err}"
    );
}
