// A minimal streaming JSON writer for the results file (objects, arrays, numbers, strings).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace vb {

class JsonWriter {
 public:
  JsonWriter& open(const char* key = nullptr) { return start(key, '{'); }
  JsonWriter& open_array(const char* key = nullptr) { return start(key, '['); }
  JsonWriter& close() {
    char c = stack_.back() == '{' ? '}' : ']';
    bool empty = first_.back();
    stack_.pop_back();
    first_.pop_back();
    if (!empty) newline();
    out_ += c;
    return *this;
  }
  JsonWriter& num(const char* key, double v) {
    name(key);
    if (!std::isfinite(v)) {
      out_ += "null";
    } else {
      char b[64];
      std::snprintf(b, sizeof(b), "%.10g", v);
      out_ += b;
    }
    return *this;
  }
  JsonWriter& num(const char* key, uint64_t v) {
    name(key);
    out_ += std::to_string(v);
    return *this;
  }
  JsonWriter& num(const char* key, int64_t v) {
    name(key);
    out_ += std::to_string(v);
    return *this;
  }
  JsonWriter& num(const char* key, int v) { return num(key, int64_t(v)); }
  JsonWriter& num(const char* key, uint32_t v) { return num(key, uint64_t(v)); }
  JsonWriter& boolean(const char* key, bool v) {
    name(key);
    out_ += v ? "true" : "false";
    return *this;
  }
  JsonWriter& null(const char* key) {
    name(key);
    out_ += "null";
    return *this;
  }
  JsonWriter& str(const char* key, const std::string& v) {
    name(key);
    out_ += '"';
    for (unsigned char c : v) {
      if (c == '"' || c == '\\') {
        out_ += '\\';
        out_ += char(c);
      } else if (c < 0x20) {
        char b[8];
        std::snprintf(b, sizeof(b), "\\u%04x", c);
        out_ += b;
      } else {
        out_ += char(c);
      }
    }
    out_ += '"';
    return *this;
  }
  const std::string& text() const { return out_; }

 private:
  JsonWriter& start(const char* key, char c) {
    name(key);
    out_ += c;
    stack_.push_back(c);
    first_.push_back(true);
    return *this;
  }
  void newline() {
    out_ += '\n';
    out_.append(2 * stack_.size(), ' ');
  }
  void name(const char* key) {
    if (!first_.empty()) {
      if (!first_.back()) out_ += ',';
      first_.back() = false;
      newline();
    }
    if (key != nullptr) {
      out_ += '"';
      out_ += key;
      out_ += "\": ";
    }
  }
  std::string out_;
  std::vector<char> stack_;
  std::vector<bool> first_;
};

}  // namespace vb
