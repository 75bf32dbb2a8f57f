//! The login both web sides mount: `GET`/`POST /login`, `POST /logout`, and the guard in front
//! of every other route (a redirect to `/login` for pages, `401` for `/api/…`). Each side keeps
//! its own look by passing the function that wraps a body in its page.
//!
//! What it defends against: guessing (failed logins slow down per user name and per address;
//! an unknown name costs the same Argon2 work as a wrong password; at most two hashes run at
//! once, so a flood of logins cannot take the memory), sessions left open (idle and absolute
//! expiry; logout removes the cookie; `Secure` behind HTTPS), and requests forged by another
//! page (every state-changing request must carry its session's form token: the guard adds it to
//! the `action` of every `method="post"` form of the pages it serves, and refuses a POST
//! without it).

use crate::auth::{LoginForm, SessionPolicy, Sessions, User, check_login, session_token};
use crate::html_escape;
use crate::i18n::Lang;
use crate::throttle::Throttle;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wraps a body (HTML) in a whole page in a language with the given title, in the side's own
/// look.
pub type PageFn = fn(lang: Lang, title: &str, body: &str) -> String;

/// The logged-in user, set by the guard as a request extension (absent where the side is open
/// without accounts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn(pub String);

/// The query parameter (or `X-CSRF-Token` header) that carries a session's form token.
pub const FORM_TOKEN: &str = "csrf";
/// Password hashes computed at once (Argon2 holds about 19 MiB each).
const HASHING_AT_ONCE: usize = 2;
/// How long a login waits for its turn to be checked before it is told to try again.
const HASHING_WAIT: Duration = Duration::from_secs(10);
/// Largest login form.
const LOGIN_BODY_LIMIT: usize = 4096;
/// Largest page the guard adds form tokens to (larger responses pass untouched).
const PAGE_LIMIT: usize = 16 << 20;

/// Accounts, sessions and how a side asks for a login.
pub struct Login {
    users: Vec<User>,
    sessions: Sessions,
    throttle: Throttle,
    hashing: tokio::sync::Semaphore,
    open_without_accounts: bool,
    page: PageFn,
    /// The side's language: the login page's, and every user's without one of their own.
    lang: Lang,
}

impl Login {
    /// Every guarded route needs a login, even with no accounts (the appliance, which makes
    /// its first account itself).
    pub fn required(users: Vec<User>, page: PageFn, lang: Lang) -> Arc<Self> {
        Self::build(users, page, lang, false, SessionPolicy::default())
    }

    /// A login is needed only where accounts are configured (central, which otherwise sits on
    /// the loopback address or behind the lab's authenticating proxy).
    pub fn where_accounts(users: Vec<User>, page: PageFn, lang: Lang) -> Arc<Self> {
        Self::build(users, page, lang, true, SessionPolicy::default())
    }

    /// As [`Login::required`], with its own session policy.
    pub fn with_policy(users: Vec<User>, page: PageFn, lang: Lang, policy: SessionPolicy) -> Arc<Self> {
        Self::build(users, page, lang, false, policy)
    }

    fn build(
        users: Vec<User>,
        page: PageFn,
        lang: Lang,
        open_without_accounts: bool,
        policy: SessionPolicy,
    ) -> Arc<Self> {
        Arc::new(Login {
            users,
            sessions: Sessions::with_policy(policy),
            throttle: Throttle::default(),
            hashing: tokio::sync::Semaphore::new(HASHING_AT_ONCE),
            open_without_accounts,
            page,
            lang,
        })
    }

    /// The language of a user's pages: their own where their account names one, else the
    /// side's (also for no user: a side open without accounts).
    pub fn language(&self, user: Option<&str>) -> Lang {
        user.and_then(|name| self.users.iter().find(|u| u.name == name))
            .and_then(|u| u.language.as_deref())
            .and_then(Lang::from_code)
            .unwrap_or(self.lang)
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
            .layer(DefaultBodyLimit::max(LOGIN_BODY_LIMIT))
            .with_state(self.clone())
    }

    /// Puts every route of `private` behind the login.
    pub fn guard<S: Clone + Send + Sync + 'static>(self: &Arc<Self>, private: Router<S>) -> Router<S> {
        private.layer(middleware::from_fn_with_state(self.clone(), require_login))
    }

    /// The login form in the side's language, with a message (its key and arguments) above it.
    fn form(&self, message: Option<Message<'_>>) -> Html<String> {
        let lang = self.lang;
        let t = |k: &str| html_escape(&lang.t(k, &[]));
        let msg = match message {
            None => String::new(),
            Some((key, args)) => format!(
                "<p class=\"error\" id=\"error\">{}</p>",
                html_escape(&lang.t(key, args))
            ),
        };
        Html((self.page)(
            lang,
            &lang.t("login_title", &[]),
            &format!(
                "{msg}<form method=\"post\" action=\"/login\"><p><label>{user} <input name=\"user\" id=\"user\" autocomplete=\"username\"></label></p>\
                 <p><label>{password} <input type=\"password\" name=\"password\" id=\"password\" autocomplete=\"current-password\"></label></p>\
                 <p><button id=\"login\">{button}</button></p></form>",
                user = t("login_user"),
                password = t("login_password"),
                button = t("login_button"),
            ),
        ))
    }
}

/// A message of the login form: its text's key and the text's arguments.
type Message<'a> = (&'a str, &'a [(&'a str, &'a dyn std::fmt::Display)]);

/// The session token a request carries.
fn token_of(headers: &HeaderMap) -> Option<String> {
    session_token(headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()))
}

/// The form token a request carries: `?csrf=` in its URL, or the `X-CSRF-Token` header.
fn form_token_of(req: &Request) -> Option<String> {
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == FORM_TOKEN)
            .map(|(_, v)| v.to_string())
    });
    from_query.or_else(|| {
        req.headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
}

/// Adds `csrf=<token>` to the `action` of every `method="post"` form of a page.
pub fn with_form_token(html: &str, token: &str) -> String {
    let mut out = String::with_capacity(html.len() + 256);
    let mut rest = html;
    while let Some(i) = rest.find("<form") {
        let Some(end) = rest[i..].find('>').map(|e| i + e) else {
            break;
        };
        let tag = &rest[i..end];
        out.push_str(&rest[..i]);
        let post = tag.to_ascii_lowercase().contains("method=\"post\"");
        match (post, tag.find("action=\"")) {
            (true, Some(a)) => {
                let value_start = a + "action=\"".len();
                let close = tag[value_start..].find('"').map_or(tag.len(), |c| value_start + c);
                let sep = if tag[value_start..close].contains('?') {
                    "&amp;"
                } else {
                    "?"
                };
                out.push_str(&tag[..close]);
                out.push_str(&format!("{sep}{FORM_TOKEN}={token}"));
                out.push_str(&tag[close..]);
            }
            _ => out.push_str(tag),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

async fn require_login(State(l): State<Arc<Login>>, mut req: Request, next: Next) -> Response {
    if l.open_without_accounts && !l.has_accounts() {
        return next.run(req).await;
    }
    let Some(session) = token_of(req.headers()) else {
        return not_logged_in(&req);
    };
    let (Some(user), Some(form_token)) = (l.sessions.user(&session), l.sessions.form_token(&session)) else {
        return not_logged_in(&req);
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD)
        && form_token_of(&req).as_deref() != Some(form_token.as_str())
    {
        tracing::warn!(user = %user, path = %req.uri().path(), "a request without its session's form token was refused");
        let lang = l.language(Some(&user));
        return (
            StatusCode::FORBIDDEN,
            Html((l.page)(
                lang,
                &lang.t("not_done", &[]),
                &format!(
                    "<p class=\"error\" id=\"error\">{}</p>",
                    html_escape(&lang.t("form_stale", &[]))
                ),
            )),
        )
            .into_response();
    }
    req.extensions_mut().insert(LoggedIn(user));
    let response = next.run(req).await;
    let html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if !html {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    match axum::body::to_bytes(body, PAGE_LIMIT).await {
        Ok(bytes) => {
            let page = with_form_token(&String::from_utf8_lossy(&bytes), &form_token);
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, axum::body::Body::from(page))
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("page too large: {e}")).into_response(),
    }
}

fn not_logged_in(req: &Request) -> Response {
    if req.uri().path().starts_with("/api/") {
        (StatusCode::UNAUTHORIZED, "log in first").into_response()
    } else {
        Redirect::to("/login").into_response()
    }
}

async fn login_page(State(l): State<Arc<Login>>) -> Html<String> {
    l.form(None)
}

/// Whether the page was asked for over HTTPS (directly, or through a proxy that says so).
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

async fn login(State(l): State<Arc<Login>>, req: Request) -> Response {
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let secure = over_https(req.headers());
    let f = match Form::<LoginForm>::from_request(req, &()).await {
        Ok(Form(f)) => f,
        Err(r) => return (r.status(), l.form(Some(("login_bad_form", &[])))).into_response(),
    };
    let keys: Vec<String> = [Some(format!("user:{}", f.user)), address.map(|a| format!("addr:{a}"))]
        .into_iter()
        .flatten()
        .collect();
    let now = Instant::now();
    if let Some(wait) = keys.iter().filter_map(|k| l.throttle.wait(k, now)).max() {
        let secs = wait.as_secs().max(1);
        tracing::warn!(user = %f.user, "login refused: too many failures");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, HeaderValue::from(secs))],
            l.form(Some(("login_too_many", &[("secs", &secs)]))),
        )
            .into_response();
    }
    // Argon2 takes tens of milliseconds and ~19 MiB: a few at a time, off the async workers.
    let Ok(Ok(_permit)) = tokio::time::timeout(HASHING_WAIT, l.hashing.acquire()).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, l.form(Some(("login_busy", &[])))).into_response();
    };
    let (login, name) = (l.clone(), f.user.clone());
    let user = tokio::task::spawn_blocking(move || check_login(&login.users, &f))
        .await
        .ok()
        .flatten();
    match user {
        Some(u) => {
            keys.iter().for_each(|k| l.throttle.succeeded(k));
            let cookie = Sessions::cookie(&l.sessions.start(&u), secure);
            match HeaderValue::from_str(&cookie) {
                Ok(c) => ([(header::SET_COOKIE, c)], Redirect::to("/")).into_response(),
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        None => {
            keys.iter().for_each(|k| l.throttle.failed(k, Instant::now()));
            tracing::warn!(user = %name, "failed login");
            (StatusCode::UNAUTHORIZED, l.form(Some(("login_wrong", &[])))).into_response()
        }
    }
}

async fn logout(State(l): State<Arc<Login>>, headers: HeaderMap) -> Response {
    if let Some(t) = token_of(&headers) {
        l.sessions.end(&t);
    }
    let clear = HeaderValue::from_str(&Sessions::clear_cookie()).expect("a plain header value");
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_password;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn page(lang: Lang, title: &str, body: &str) -> String {
        format!("<html lang=\"{}\"><title>{title}</title>{body}", lang.code())
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
            .route("/api/x", get(|| async { "data" }))
            .route(
                "/form",
                get(|| async {
                    Html("<form method=\"post\" action=\"/do\"><button>Go</button></form><form action=\"/search\">")
                }),
            )
            .route("/do", post(|| async { "done" }));
        let app: Router = Router::new().merge(login.routes()).merge(login.guard(private));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .await
                .unwrap()
        });
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
            language: None,
        }]
    }

    #[tokio::test]
    async fn guarded_routes_need_a_session_that_logout_ends() {
        let addr = serve(Login::required(users(), page, Lang::En)).await;
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
    async fn the_login_speaks_the_sides_language_and_each_user_may_have_their_own() {
        let mut accounts = users();
        accounts.push(User {
            name: "ana".into(),
            password_hash: accounts[0].password_hash.clone(),
            language: Some("pt-BR".into()),
        });
        let login = Login::required(accounts, page, Lang::Fr);
        assert_eq!(login.language(Some("ana")), Lang::Pt);
        assert_eq!(login.language(Some("tech")), Lang::Fr);
        assert_eq!(login.language(Some("nobody")), Lang::Fr);
        assert_eq!(login.language(None), Lang::Fr);
        let addr = serve(login).await;
        let form = http(addr, "GET", "/login", "", "").await;
        assert!(
            form.contains("<html lang=\"fr\"><title>Connexion</title>") && form.contains("Mot de passe"),
            "{form}"
        );
        let wrong = http(addr, "POST", "/login", "", "user=tech&password=nope").await;
        assert!(wrong.contains("Utilisateur ou mot de passe incorrect."), "{wrong}");
    }

    async fn log_in(addr: SocketAddr) -> String {
        let ok = http(addr, "POST", "/login", "", "user=tech&password=slide").await;
        ok.lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .expect("a session cookie")
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn a_post_needs_its_sessions_form_token_which_the_pages_forms_carry() {
        let addr = serve(Login::required(users(), page, Lang::En)).await;
        let (a, b) = (log_in(addr).await, log_in(addr).await);
        let form = http(addr, "GET", "/form", &a, "").await;
        let token = form
            .split("action=\"/do?csrf=")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("the post form carries the token")
            .to_string();
        assert!(
            form.contains("<form action=\"/search\">"),
            "a GET form is left alone: {form}"
        );
        // Another page (another port of localhost is the same site) posting with the cookie alone.
        assert!(http(addr, "POST", "/do", &a, "").await.starts_with("HTTP/1.1 403"));
        assert!(
            http(addr, "POST", &format!("/do?csrf={token}"), &a, "")
                .await
                .ends_with("done")
        );
        let other = http(addr, "POST", &format!("/do?csrf={token}"), &b, "").await;
        assert!(
            other.starts_with("HTTP/1.1 403"),
            "one session's token is not another's"
        );
    }

    #[tokio::test]
    async fn failed_logins_wait_and_logout_removes_the_cookie() {
        let addr = serve(Login::required(users(), page, Lang::En)).await;
        for _ in 0..crate::throttle::FREE_FAILURES {
            let r = http(addr, "POST", "/login", "", "user=tech&password=nope").await;
            assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        }
        let r = http(addr, "POST", "/login", "", "user=tech&password=slide").await;
        assert!(
            r.starts_with("HTTP/1.1 429") && r.contains("retry-after: "),
            "even the right password waits: {r}"
        );
        // A login form of megabytes is refused unread.
        let huge = format!("user=tech&password={}", "x".repeat(1 << 20));
        assert!(
            http(addr, "POST", "/login", "", &huge)
                .await
                .starts_with("HTTP/1.1 413")
        );

        let addr = serve(Login::required(users(), page, Lang::En)).await;
        let cookie = log_in(addr).await;
        let out = http(addr, "POST", "/logout", &cookie, "").await;
        assert!(out.contains("Max-Age=0"), "{out}");
    }

    #[tokio::test]
    async fn a_side_open_without_accounts_asks_for_a_login_once_it_has_one() {
        let open = serve(Login::where_accounts(Vec::new(), page, Lang::En)).await;
        assert!(http(open, "GET", "/", "", "").await.ends_with("hello anyone"));
        let appliance_without_accounts = serve(Login::required(Vec::new(), page, Lang::En)).await;
        assert!(
            http(appliance_without_accounts, "GET", "/", "", "")
                .await
                .contains("location: /login")
        );
        let with_accounts = serve(Login::where_accounts(users(), page, Lang::En)).await;
        assert!(
            http(with_accounts, "GET", "/api/x", "", "")
                .await
                .starts_with("HTTP/1.1 401")
        );
    }
}
