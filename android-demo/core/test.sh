#!/usr/bin/env bash
# Compile android-demo's pure-Kotlin :core module and run its JUnit tests on the JVM, without Gradle or the Android
# SDK (neither is needed: :core has no Android imports). The same sources build unchanged in Gradle.
#
#   bash android-demo/core/test.sh [GOLDEN_DIR]      # GOLDEN_DIR: a folder `derm golden` wrote (else $DERM_GOLDEN)
#
# Needs Java 17+, Debian's junit4 + libandroid-json-java (Android's own org.json), and kotlinc: the npm package
# kotlin-compiler (pinned below) is installed into android-demo/core/.tools on first use. Prints "N passed, N failed".
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
KOTLIN_VERSION=2.4.20
TOOLS="$HERE/.tools"
KOTLINC="$TOOLS/node_modules/kotlin-compiler/bin/kotlinc"
if [ ! -x "$KOTLINC" ]; then
    echo "installing kotlin-compiler $KOTLIN_VERSION from npm into $TOOLS" >&2
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --silent --no-audit --no-fund "kotlin-compiler@$KOTLIN_VERSION" >&2
fi
JARS=/usr/share/java
for jar in junit4.jar hamcrest-core.jar com.android.json.jar; do
    [ -f "$JARS/$jar" ] || { echo "missing $JARS/$jar: apt-get install junit4 libandroid-json-java" >&2; exit 2; }
done
CP="$JARS/junit4.jar:$JARS/hamcrest-core.jar:$JARS/com.android.json.jar"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
"$KOTLINC" -nowarn -jvm-target 17 -cp "$CP" -d "$OUT/classes" "$HERE/src/main/kotlin" "$HERE/src/test/kotlin" 2>&1 \
    | grep -v "^warning: unable to find kotlin-stdlib" >&2 || true
[ -f "$OUT/classes/derm/core/RunTestsKt.class" ] || { echo "compilation failed" >&2; exit 1; }
STDLIB="$(dirname "$KOTLINC")/../lib/kotlin-stdlib.jar"
GOLDEN="${1:-${DERM_GOLDEN:-}}"
exec java ${GOLDEN:+-Dderm.golden="$GOLDEN"} -cp "$OUT/classes:$CP:$STDLIB" derm.core.RunTestsKt
