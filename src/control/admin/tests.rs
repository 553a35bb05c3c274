//! The admin routes against a fake balancer: no sockets, no loop.

use super::*;

#[derive(Default)]
struct Fake {
    sent: Vec<(Target, Outgoing)>,
    changes: Vec<BackendChange>,
    reach: usize,
}

impl AdminApi for Fake {
    fn status_page(&self) -> String {
        "<html>page</html>".into()
    }
    fn metrics(&self) -> String {
        "wslb_up 1\n".into()
    }
    fn backends(&self) -> Vec<BackendRow> {
        Vec::new()
    }
    fn clients(&self) -> Vec<ClientSummary> {
        vec![ClientSummary {
            id: 3,
            peer: "127.0.0.1:9".parse().unwrap(),
            backend: Some(0),
            websocket: true,
            age_secs: 1,
            bytes: (2, 4),
        }]
    }
    fn send(&mut self, to: &Target, msg: &Outgoing) -> usize {
        self.sent.push((to.clone(), msg.clone()));
        self.reach
    }
    fn ready(&self) -> bool {
        self.reach > 0
    }
    fn change_backend(&mut self, change: BackendChange) -> Result<Value, ChangeError> {
        let name = match &change {
            BackendChange::Remove(n) | BackendChange::Drain(n) | BackendChange::Undrain(n) => {
                n.clone()
            }
            BackendChange::Update { name, .. } => name.clone(),
            BackendChange::Add(spec) => spec.clone(),
        };
        if name.contains("missing") {
            return Err(ChangeError::NotFound(format!("no backend {name}")));
        }
        self.changes.push(change);
        Ok(json!({ "name": name }))
    }
}

fn req(method: &str, target: &str, content_type: &str, body: &[u8]) -> AdminRequest {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    AdminRequest {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        content_type: content_type.into(),
        body: body.to_vec(),
    }
}

fn call(api: &mut Fake, method: &str, target: &str, body: &str) -> (u16, Value) {
    let (status, ctype, body) = route(
        api,
        &req(method, target, "application/json", body.as_bytes()),
    );
    let v = if ctype == JSON {
        serde_json::from_slice(&body).unwrap()
    } else {
        Value::String(String::from_utf8(body).unwrap())
    };
    (status, v)
}

#[test]
fn pages_and_lists() {
    let mut api = Fake::default();
    assert_eq!(call(&mut api, "GET", "/", "").0, 200);
    assert_eq!(call(&mut api, "GET", "/metrics", "").1, "wslb_up 1\n");
    let (status, clients) = call(&mut api, "GET", "/api/clients", "");
    assert_eq!(status, 200);
    assert_eq!(clients[0]["peer"], "127.0.0.1:9");
    assert_eq!(clients[0]["bytes_down"], 4);
    assert_eq!(call(&mut api, "PUT", "/api/clients", "").0, 405);
    assert_eq!(call(&mut api, "GET", "/ready", "").0, 503);
    api.reach = 1;
    assert_eq!(call(&mut api, "GET", "/ready", "").1["ready"], true);
    assert_eq!(call(&mut api, "GET", "/nope", "").0, 404);
}

#[test]
fn messages_pick_their_target_and_frame_type() {
    let mut api = Fake {
        reach: 2,
        ..Fake::default()
    };
    let (status, v) = route_text(
        &mut api,
        "POST",
        "/api/broadcast?tag=zone%3Deu",
        "form",
        "hi",
    );
    assert_eq!((status, v["sent"].as_u64()), (200, Some(2)));
    assert_eq!(
        api.sent[0],
        (
            Target::Tag("zone".into(), "eu".into()),
            Outgoing::Text("hi".into())
        )
    );
    route_text(
        &mut api,
        "POST",
        "/api/broadcast",
        "application/octet-stream",
        "b",
    );
    assert_eq!(api.sent[1].1, Outgoing::Binary(b"b".to_vec()));
    assert_eq!(
        route_text(&mut api, "POST", "/api/broadcast?tag=bad", "", "x").0,
        400
    );
    assert_eq!(
        route_text(&mut api, "DELETE", "/api/clients/7?code=1005", "", "").0,
        400
    );
    assert_eq!(
        route_text(&mut api, "DELETE", "/api/clients/7?code=4000", "", "").0,
        200
    );
    assert_eq!(api.sent.last().unwrap().1, Outgoing::Close(4000));
    api.reach = 0;
    assert_eq!(
        route_text(&mut api, "POST", "/api/clients/7/send", "", "x").0,
        404
    );
}

fn route_text(api: &mut Fake, method: &str, target: &str, ctype: &str, body: &str) -> (u16, Value) {
    let ctype = if ctype == "form" {
        "application/x-www-form-urlencoded"
    } else {
        ctype
    };
    let (status, _, body) = route(api, &req(method, target, ctype, body.as_bytes()));
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn backend_changes_are_checked_before_they_reach_the_balancer() {
    let mut api = Fake::default();
    let (status, _) = call(
        &mut api,
        "POST",
        "/api/backends",
        r#"{"url":"ws://127.0.0.1:9001","weight":3,"max_connections":10}"#,
    );
    assert_eq!(status, 201);
    assert_eq!(
        api.changes[0],
        BackendChange::Add("ws://127.0.0.1:9001,weight=3,max_connections=10".into())
    );
    for bad in [
        "not json",
        r#"{"weight":2}"#,
        r#"{"url":"ws://127.0.0.1:1,weight=2"}"#,
        r#"{"url":"ws://127.0.0.1:1","weight":-1}"#,
    ] {
        let (status, v) = call(&mut api, "POST", "/api/backends", bad);
        assert_eq!(status, 400, "{bad}");
        assert!(v["error"].is_string());
    }
    let (status, _) = call(
        &mut api,
        "PATCH",
        "/api/backends/ws%3A%2F%2Fa%3A1",
        r#"{"weight":5}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(
        api.changes[1],
        BackendChange::Update {
            name: "ws://a:1".into(),
            weight: Some(5),
            max_connections: None
        }
    );
    assert_eq!(
        call(&mut api, "PATCH", "/api/backends/g", r#"{"weight":0}"#).0,
        400
    );
    assert_eq!(call(&mut api, "PATCH", "/api/backends/g", "{}").0, 400);
    assert_eq!(call(&mut api, "POST", "/api/backends/g/undrain", "").0, 200);
    assert_eq!(api.changes[2], BackendChange::Undrain("g".into()));
    assert_eq!(call(&mut api, "DELETE", "/api/backends/missing", "").0, 404);
    assert_eq!(call(&mut api, "PUT", "/api/backends/g", "").0, 405);
    assert_eq!(api.changes.len(), 3, "refused requests changed nothing");
}
