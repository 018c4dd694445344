// Java's SunPKCS11 provider against libpkcs11ws.so (run by tests/consumers/test_dropin_java.py).
//
// Usage: java P11Test <SunPKCS11 config file>; the passphrase comes from $PKCS11WS_TEST_PIN
// (never argv). Prints "PASS <check>" per check and "ALL PASSED" at the end; any failure
// throws (non-zero exit). Results are compared with the JDK's own SunJCE provider for keys
// imported from known bytes; generated keys (never extractable) are checked by round trips.

import java.nio.charset.StandardCharsets;
import java.security.Key;
import java.security.KeyStore;
import java.security.Provider;
import java.security.SecureRandom;
import java.security.Security;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import javax.crypto.Cipher;
import javax.crypto.KeyGenerator;
import javax.crypto.Mac;
import javax.crypto.SecretKey;
import javax.crypto.spec.IvParameterSpec;
import javax.crypto.spec.SecretKeySpec;

public final class P11Test {
    private static final SecureRandom RNG = new SecureRandom();
    private static Provider p11;

    private static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError("FAILED " + what);
        }
    }

    private static void pass(String what) {
        System.out.println("PASS " + what);
        System.out.flush();
    }

    private static byte[] random(int n) {
        byte[] b = new byte[n];
        RNG.nextBytes(b);
        return b;
    }

    // Feeds the input in uneven parts (Cipher.update then doFinal): C_*Update / C_*Final.
    private static byte[] run(Cipher c, byte[] in) throws Exception {
        java.io.ByteArrayOutputStream out = new java.io.ByteArrayOutputStream();
        int[] steps = {1, 15, 16, 17, 33, 7, 100};
        int pos = 0;
        int i = 0;
        while (pos < in.length) {
            int n = Math.min(steps[i++ % steps.length], in.length - pos);
            byte[] part = c.update(in, pos, n);
            if (part != null) {
                out.write(part);
            }
            pos += n;
        }
        out.write(c.doFinal());
        return out.toByteArray();
    }

    private static byte[] cipher(String transform, Provider prov, int mode, Key key, byte[] iv,
                                 byte[] in) throws Exception {
        Cipher c = Cipher.getInstance(transform, prov);
        c.init(mode, key, new IvParameterSpec(iv));
        return run(c, in);
    }

    private static byte[] mac(String alg, Provider prov, Key key, byte[] in) throws Exception {
        Mac m = Mac.getInstance(alg, prov);
        m.init(key);
        int half = in.length / 2;
        m.update(in, 0, half);  // C_SignUpdate twice, then C_SignFinal
        m.update(in, half, in.length - half);
        return m.doFinal();
    }

    public static void main(String[] args) throws Exception {
        String pin = System.getenv("PKCS11WS_TEST_PIN");
        check(pin != null, "PKCS11WS_TEST_PIN is set");
        p11 = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p11);
        Provider jce = Security.getProvider("SunJCE");

        // KeyStore.load logs in (C_Login); aliases are the secret keys' labels.
        KeyStore ks = KeyStore.getInstance("PKCS11", p11);
        ks.load(null, pin.toCharArray());
        List<String> before = Collections.list(ks.aliases());
        pass("keystore login (" + before.size() + " aliases)");

        byte[] plain = random(1000);
        byte[] blocks = random(512);
        String[] modes = {"AES/CBC/PKCS5Padding", "AES/CBC/NoPadding"};

        // Imported keys (C_CreateObject of a SecretKeySpec): equal to SunJCE, both ways.
        for (int bits : new int[] {128, 192, 256}) {
            SecretKeySpec spec = new SecretKeySpec(random(bits / 8), "AES");
            byte[] iv = random(16);
            for (String t : modes) {
                byte[] in = t.endsWith("NoPadding") ? blocks : plain;
                byte[] ours = cipher(t, p11, Cipher.ENCRYPT_MODE, spec, iv, in);
                byte[] theirs = cipher(t, jce, Cipher.ENCRYPT_MODE, spec, iv, in);
                check(Arrays.equals(ours, theirs), t + " " + bits + " equals SunJCE");
                byte[] back = cipher(t, p11, Cipher.DECRYPT_MODE, spec, iv, theirs);
                check(Arrays.equals(back, in), t + " " + bits + " decrypts SunJCE");
                // One doFinal call as well (single update).
                Cipher one = Cipher.getInstance(t, p11);
                one.init(Cipher.ENCRYPT_MODE, spec, new IvParameterSpec(iv));
                check(Arrays.equals(one.doFinal(in), theirs), t + " " + bits + " one-shot");
            }
            pass("imported AES-" + bits + " CBC and CBC-PAD equal SunJCE");
        }
        for (String alg : new String[] {"HmacSHA256", "HmacSHA384", "HmacSHA512"}) {
            SecretKeySpec spec = new SecretKeySpec(random(48), alg);
            byte[] msg = random(5000);
            check(Arrays.equals(mac(alg, p11, spec, msg), mac(alg, jce, spec, msg)),
                  alg + " equals SunJCE");
            pass("imported " + alg + " equals SunJCE");
        }

        // Generated keys: token, private, sensitive, never extractable (provider config).
        SecretKey first = null;
        for (int bits : new int[] {128, 192, 256}) {
            KeyGenerator kg = KeyGenerator.getInstance("AES", p11);
            kg.init(bits);
            SecretKey k = kg.generateKey();
            check(k.getEncoded() == null, "generated AES-" + bits + " is not extractable");
            byte[] iv = random(16);
            for (String t : modes) {
                byte[] in = t.endsWith("NoPadding") ? blocks : plain;
                byte[] ct = cipher(t, p11, Cipher.ENCRYPT_MODE, k, iv, in);
                check(!Arrays.equals(ct, in), t + " changes the data");
                check(Arrays.equals(cipher(t, p11, Cipher.DECRYPT_MODE, k, iv, ct), in),
                      t + " generated AES-" + bits + " round trip");
            }
            if (first == null) {
                first = k;
            }
            pass("generated AES-" + bits + " CBC and CBC-PAD round trips");
        }
        for (String alg : new String[] {"HmacSHA256", "HmacSHA384", "HmacSHA512"}) {
            KeyGenerator kg = KeyGenerator.getInstance(alg, p11);
            SecretKey k = kg.generateKey();
            byte[] msg = random(3000);
            byte[] a = mac(alg, p11, k, msg);
            byte[] b = mac(alg, p11, k, msg);
            check(Arrays.equals(a, b) && a.length == Mac.getInstance(alg, jce).getMacLength(),
                  alg + " generated key MAC is stable");
            msg[0] ^= 1;
            check(!Arrays.equals(a, mac(alg, p11, k, msg)), alg + " MAC depends on data");
            pass("generated " + alg + " MAC");
        }

        // KeyStore entries: setKeyEntry copies the key under the alias (C_CopyObject),
        // getKey finds it by label, deleteEntry destroys it (C_DestroyObject).
        byte[] iv = random(16);
        byte[] want = cipher(modes[0], p11, Cipher.ENCRYPT_MODE, first, iv, plain);
        String alias = "java-alias-" + Long.toHexString(RNG.nextLong());
        ks.setKeyEntry(alias, first, null, null);
        check(ks.containsAlias(alias) && ks.isKeyEntry(alias), "alias stored");
        Key got = ks.getKey(alias, null);
        check(got != null, "getKey finds the alias");
        check(Arrays.equals(cipher(modes[0], p11, Cipher.ENCRYPT_MODE, got, iv, plain), want),
              "the stored entry is the same key");
        pass("KeyStore.setKeyEntry / getKey (C_CopyObject)");

        String imported = alias + "-imported";
        SecretKeySpec spec = new SecretKeySpec(random(32), "AES");
        ks.setEntry(imported, new KeyStore.SecretKeyEntry(spec), null);
        Key back = ks.getKey(imported, null);
        check(back != null, "getKey finds the imported entry");
        byte[] jceCt = cipher(modes[0], jce, Cipher.ENCRYPT_MODE, spec, iv, plain);
        check(Arrays.equals(cipher(modes[0], p11, Cipher.ENCRYPT_MODE, back, iv, plain), jceCt),
              "the imported entry equals SunJCE");
        pass("KeyStore.setEntry of a SecretKeySpec (C_CreateObject with a label)");

        ks.deleteEntry(alias);
        ks.deleteEntry(imported);
        check(!ks.containsAlias(alias) && !ks.containsAlias(imported), "aliases deleted");
        KeyStore again = KeyStore.getInstance("PKCS11", p11);
        again.load(null, pin.toCharArray());
        check(!again.containsAlias(alias) && again.getKey(alias, null) == null,
              "the deleted alias is gone from the token");
        pass("KeyStore.deleteEntry (C_DestroyObject)");

        System.out.println("ALL PASSED " + new String("ok".getBytes(StandardCharsets.UTF_8),
                                                       StandardCharsets.UTF_8));
    }
}
