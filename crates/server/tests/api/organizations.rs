//! `admin create-org`'s use case (`ops::create_organization`) racing itself: two operators
//! creating one name at once.

use crate::faulty_store::FaultyStore;
use crate::helpers::both_backends;
use keyplane_core::Operator;
use keyplane_server::ops::{self, OrgRefused, OrgSpec};
use keyplane_store::testing::{Backend, TestDatabase};

both_backends!(creating_one_name_at_once_creates_it_once);

/// The first operator's creation is held after its checks, just before its write reaches the
/// store, while the second's runs to the end: the first is then refused the name, naming the
/// second's organization, with a token or without (`--no-token`). One organization has the name.
async fn creating_one_name_at_once_creates_it_once(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = FaultyStore::new(keyplane_store::connect(&db.url).await.expect("connect"));
    let operator = Operator {
        os_user: "test".into(),
        name: None,
    };
    for (name, with_token) in [("acme", true), ("globex", false)] {
        let spec = OrgSpec {
            name,
            id: None,
            with_token,
            allow_duplicate_name: false,
        };
        let mut held = store.hold_next_change();
        let first = ops::create_organization(store.as_ref(), &spec, &operator);
        let second = async {
            held.reached().await;
            let second = ops::create_organization(store.as_ref(), &spec, &operator).await;
            held.release();
            second
        };
        let (first, second) = tokio::join!(first, second);
        let second = second.unwrap_or_else(|e| panic!("{name}: {e}"));
        match first {
            Err(OrgRefused::NameTaken(id, taken)) => {
                assert_eq!((id, taken.as_str()), (second.tenant.id, name));
            }
            Err(other) => panic!("{name}: {other}"),
            Ok(made) => panic!(
                "{name}: created twice, {} and {}",
                made.tenant.id, second.tenant.id
            ),
        }
        let listed = ops::list_organizations(store.as_ref(), Some(name), None, 10)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1, "{name}: {listed:?}");
    }
}
