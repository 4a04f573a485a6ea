//! The smallest client `openlora bench --url` needs: a streamed `POST /v1/completions` over
//! plain HTTP/1.1 (one connection per request, as a load generator opens them), reporting when
//! the first token arrived and how many the server said it generated; and `GET /v1/models`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Where a running server is: `host:port`, and the bearer key to send (if any).
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// `Authorization: Bearer` value.
    pub api_key: Option<String>,
}

impl Endpoint {
    /// Parses `http://host:port` (a trailing `/` allowed; no TLS).
    pub fn parse(url: &str, api_key: Option<String>) -> Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| Error::device(format!("{url}: only http:// URLs")))?;
        let addr = rest.trim_end_matches('/');
        if addr.is_empty() || addr.contains('/') {
            return Err(Error::device(format!("{url}: expected http://host:port")));
        }
        Ok(Endpoint { addr: addr.to_string(), api_key })
    }

    /// Sends one request and returns the response's status and a reader of its body (chunked
    /// transfer decoded).
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Box<dyn BufRead + Send>)> {
        let io = |e: std::io::Error| Error::device(format!("{}: {e}", self.addr));
        let mut stream = TcpStream::connect(&self.addr).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_secs(600))).map_err(io)?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = self.api_key.as_ref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n{auth}\r\n{body}",
            self.addr,
            body.len()
        )
        .map_err(io)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(io)?;
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut chunked = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io)? == 0 || line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
        }
        Ok((
            status,
            if chunked { Box::new(BufReader::new(Chunked { inner: reader, left: 0 })) } else { Box::new(reader) },
        ))
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics_text(&self) -> Result<String> {
        let (status, mut body) = self.send("GET", "/metrics", None)?;
        let mut text = String::new();
        body.read_to_string(&mut text).map_err(|e| Error::device(e.to_string()))?;
        if status != 200 {
            return Err(Error::device(format!("GET /metrics answered {status}")));
        }
        Ok(text)
    }

    /// `GET /v1/models`: the served models' ids and their `parent` (the base, for adapters).
    pub fn models(&self) -> Result<Vec<(String, Option<String>)>> {
        let (status, mut body) = self.send("GET", "/v1/models", None)?;
        let mut text = String::new();
        body.read_to_string(&mut text).map_err(|e| Error::device(e.to_string()))?;
        if status != 200 {
            return Err(Error::device(format!("GET /v1/models answered {status}: {text}")));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::device(format!("GET /v1/models: {e}")))?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m["id"].as_str()?.to_string(), m["parent"].as_str().map(str::to_string))))
            .collect())
    }

    /// Streams one greedy completion of `prompt` token ids with `model`, generating exactly
    /// `max_tokens` (EOS ignored); returns seconds from `since` to the first token, and the
    /// tokens the final usage counts.
    pub fn complete(&self, model: &str, prompt: &[u32], max_tokens: usize, since: Instant) -> Result<(f64, usize)> {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
                          "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
        let (status, body) = self.send("POST", "/v1/completions", Some(&body))?;
        let mut ttft = None;
        let mut tokens = 0;
        let mut error = String::new();
        for line in body.lines() {
            let line = line.map_err(|e| Error::device(format!("reading the stream: {e}")))?;
            if status != 200 {
                error.push_str(&line);
                continue;
            }
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| Error::device(format!("a bad event: {e}")))?;
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                ttft.get_or_insert_with(|| since.elapsed().as_secs_f64());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
        if status != 200 {
            return Err(Error::device(format!("POST /v1/completions answered {status}: {error}")));
        }
        Ok((ttft.unwrap_or_else(|| since.elapsed().as_secs_f64()), tokens))
    }
}

/// A reader of a chunked transfer-encoded body.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut size = String::new();
            self.inner.read_line(&mut size)?;
            if size.trim().is_empty() {
                // The CRLF that ends the previous chunk.
                size.clear();
                self.inner.read_line(&mut size)?;
            }
            let hex = size.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(hex, 16)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a bad chunk size"))?;
            if self.left == 0 {
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_decoded_and_urls_checked() {
        let raw = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked { inner: &raw[..], left: 0 }.read_to_string(&mut out).expect("decode");
        assert_eq!(out, "hello, world");
        assert_eq!(Endpoint::parse("http://127.0.0.1:8080/", None).expect("url").addr, "127.0.0.1:8080");
        assert!(Endpoint::parse("https://x:1", None).is_err());
        assert!(Endpoint::parse("http://x:1/v1", None).is_err());
    }
}
