//! The login both web sides mount: `GET`/`POST /login`, `POST /logout`, and the guard in front
//! of every other route (a redirect to `/login` for pages, `401` for `/api/…`). Each side keeps
//! its own look by passing the function that wraps a body in its page.

use crate::auth::{LoginForm, Sessions, User, log_in, session_token};
use crate::html_escape;
use axum::Router;
use axum::extract::{Form, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use std::sync::Arc;

/// Wraps a body (HTML) in a whole page with the given title, in the side's own look.
pub type PageFn = fn(title: &str, body: &str) -> String;

/// The logged-in user, set by the guard as a request extension (absent where the side is open
/// without accounts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn(pub String);

/// Accounts, sessions and how a side asks for a login.
pub struct Login {
    users: Vec<User>,
    sessions: Sessions,
    open_without_accounts: bool,
    page: PageFn,
}

impl Login {
    /// Every guarded route needs a login, even with no accounts (the appliance, which makes
    /// its first account itself).
    pub fn required(users: Vec<User>, page: PageFn) -> Arc<Self> {
        Arc::new(Login {
            users,
            sessions: Sessions::default(),
            open_without_accounts: false,
            page,
        })
    }

    /// A login is needed only where accounts are configured (central, which otherwise sits on
    /// the loopback address or behind the lab's authenticating proxy).
    pub fn where_accounts(users: Vec<User>, page: PageFn) -> Arc<Self> {
        Arc::new(Login {
            open_without_accounts: true,
            ..Arc::into_inner(Self::required(users, page)).expect("just made")
        })
    }

    /// Whether any account is configured.
    pub fn has_accounts(&self) -> bool {
        !self.users.is_empty()
    }

    /// The logged-in user of a request, from its session cookie.
    pub fn user(&self, headers: &HeaderMap) -> Option<String> {
        self.sessions.user(&token_of(headers)?)
    }

    /// `GET`/`POST /login` and `POST /logout`, for any router state (merge them in before
    /// giving the side's router its state).
    pub fn routes<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Router<S> {
        Router::new()
            .route("/login", get(login_page).post(login))
            .route("/logout", post(logout))
            .with_state(self.clone())
    }

    /// Puts every route of `private` behind the login.
    pub fn guard<S: Clone + Send + Sync + 'static>(self: &Arc<Self>, private: Router<S>) -> Router<S> {
        private.layer(middleware::from_fn_with_state(self.clone(), require_login))
    }

    fn form(&self, message: &str) -> Html<String> {
        let msg = if message.is_empty() {
            String::new()
        } else {
            format!("<p class=\"error\" id=\"error\">{}</p>", html_escape(message))
        };
        Html((self.page)(
            "Log in",
            &format!(
                "{msg}<form method=\"post\" action=\"/login\"><p><label>User <input name=\"user\" id=\"user\" autocomplete=\"username\"></label></p>\
                 <p><label>Password <input type=\"password\" name=\"password\" id=\"password\" autocomplete=\"current-password\"></label></p>\
                 <p><button id=\"login\">Log in</button></p></form>"
            ),
        ))
    }
}

/// The session token a request carries.
fn token_of(headers: &HeaderMap) -> Option<String> {
    session_token(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()))
}

async fn require_login(State(l): State<Arc<Login>>, mut req: Request, next: Next) -> Response {
    if l.open_without_accounts && !l.has_accounts() {
        return next.run(req).await;
    }
    match l.user(req.headers()) {
        Some(u) => {
            req.extensions_mut().insert(LoggedIn(u));
            next.run(req).await
        }
        None if req.uri().path().starts_with("/api/") => (StatusCode::UNAUTHORIZED, "log in first").into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

async fn login_page(State(l): State<Arc<Login>>) -> Html<String> {
    l.form("")
}

async fn login(State(l): State<Arc<Login>>, Form(f): Form<LoginForm>) -> Response {
    let (login, name) = (l.clone(), f.user.clone());
    // Argon2 takes tens of milliseconds: off the async workers.
    let cookie = tokio::task::spawn_blocking(move || log_in(&login.users, &login.sessions, &f))
        .await
        .ok()
        .flatten()
        .and_then(|c| HeaderValue::from_str(&c).ok());
    match cookie {
        Some(c) => ([(header::SET_COOKIE, c)], Redirect::to("/")).into_response(),
        None => {
            tracing::warn!(user = %name, "failed login");
            (StatusCode::UNAUTHORIZED, l.form("Wrong user or password.")).into_response()
        }
    }
}

async fn logout(State(l): State<Arc<Login>>, headers: HeaderMap) -> Response {
    if let Some(t) = token_of(&headers) {
        l.sessions.end(&t);
    }
    Redirect::to("/login").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_password;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn page(title: &str, body: &str) -> String {
        format!("<title>{title}</title>{body}")
    }

    /// Serves `login` in front of `/` and `/api/x` on a free port.
    async fn serve(login: Arc<Login>) -> std::net::SocketAddr {
        let private = Router::new()
            .route(
                "/",
                get(|req: Request| async move {
                    match req.extensions().get::<LoggedIn>() {
                        Some(LoggedIn(u)) => format!("hello {u}"),
                        None => "hello anyone".to_string(),
                    }
                }),
            )
            .route("/api/x", get(|| async { "data" }));
        let app: Router = Router::new().merge(login.routes()).merge(login.guard(private));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// One HTTP/1.1 request; the whole response as text.
    async fn http(addr: std::net::SocketAddr, method: &str, path: &str, cookie: &str, body: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: {cookie}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    fn users() -> Vec<User> {
        vec![User {
            name: "tech".into(),
            password_hash: hash_password("slide").unwrap(),
        }]
    }

    #[tokio::test]
    async fn guarded_routes_need_a_session_that_logout_ends() {
        let addr = serve(Login::required(users(), page)).await;
        assert!(http(addr, "GET", "/", "", "").await.contains("location: /login"));
        assert!(http(addr, "GET", "/api/x", "", "").await.starts_with("HTTP/1.1 401"));
        let form = http(addr, "GET", "/login", "", "").await;
        assert!(form.contains("<title>Log in</title>") && form.contains("id=\"password\""));

        let wrong = http(addr, "POST", "/login", "", "user=tech&password=nope").await;
        assert!(wrong.starts_with("HTTP/1.1 401") && wrong.contains("Wrong user or password."));
        let ok = http(addr, "POST", "/login", "", "user=tech&password=slide").await;
        let cookie = ok
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .expect("a session cookie")
            .split(';')
            .next()
            .unwrap()
            .to_string();
        assert!(http(addr, "GET", "/", &cookie, "").await.ends_with("hello tech"));
        assert!(http(addr, "GET", "/api/x", &cookie, "").await.ends_with("data"));

        http(addr, "POST", "/logout", &cookie, "").await;
        assert!(http(addr, "GET", "/", &cookie, "").await.contains("location: /login"));
    }

    #[tokio::test]
    async fn a_side_open_without_accounts_asks_for_a_login_once_it_has_one() {
        let open = serve(Login::where_accounts(Vec::new(), page)).await;
        assert!(http(open, "GET", "/", "", "").await.ends_with("hello anyone"));
        let appliance_without_accounts = serve(Login::required(Vec::new(), page)).await;
        assert!(
            http(appliance_without_accounts, "GET", "/", "", "")
                .await
                .contains("location: /login")
        );
        let with_accounts = serve(Login::where_accounts(users(), page)).await;
        assert!(
            http(with_accounts, "GET", "/api/x", "", "")
                .await
                .starts_with("HTTP/1.1 401")
        );
    }
}
