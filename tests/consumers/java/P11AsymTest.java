// Java's SunPKCS11 provider with key pairs in libpkcs11ws.so (run by tests/consumers/test_consumer_java_asym.py).
//
// Usage: java P11AsymTest <SunPKCS11 config> <PKCS#12 file> <all|basic>; the passphrase comes
// from $PKCS11WS_TEST_PIN (never argv), the PKCS#12 file's password is "p12". Prints
// "PASS <check>" per check and "ALL PASSED" at the end; any failure throws. Signatures made in
// the module are verified by the JDK's own providers (SunRsaSign, SunEC) and the reverse.
// "all" adds RSASSA-PSS and AES/GCM/NoPadding, whose mechanisms take a struct parameter.

import java.security.KeyFactory;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.PublicKey;
import java.security.SecureRandom;
import java.security.Security;
import java.security.Signature;
import java.security.cert.Certificate;
import java.security.spec.ECGenParameterSpec;
import java.security.spec.MGF1ParameterSpec;
import java.security.spec.PSSParameterSpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Arrays;
import javax.crypto.Cipher;
import javax.crypto.SecretKey;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.SecretKeySpec;

public final class P11AsymTest {
    private static final SecureRandom RNG = new SecureRandom();

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

    private static byte[] sign(String alg, Provider p, PrivateKey key, byte[] data)
            throws Exception {
        Signature s = Signature.getInstance(alg, p);
        s.initSign(key);
        int half = data.length / 2;
        s.update(data, 0, half);  // C_SignUpdate twice, then C_SignFinal
        s.update(data, half, data.length - half);
        return s.sign();
    }

    private static boolean verify(String alg, String prov, PublicKey key, byte[] data, byte[] sig)
            throws Exception {
        Signature s = Signature.getInstance(alg, prov);
        s.initVerify(key);
        s.update(data);
        return s.verify(sig);
    }

    // The public half as a software key of the JDK (via its X.509 encoding).
    private static PublicKey soft(PublicKey key, String alg) throws Exception {
        return KeyFactory.getInstance(alg).generatePublic(new X509EncodedKeySpec(key.getEncoded()));
    }

    public static void main(String[] args) throws Exception {
        String pin = System.getenv("PKCS11WS_TEST_PIN");
        boolean all = args[2].equals("all");
        Provider p = Security.getProvider("SunPKCS11").configure(args[0]);
        Security.addProvider(p);
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, pin.toCharArray());
        pass("login");
        byte[] data = random(3000);

        KeyPairGenerator rsaGen = KeyPairGenerator.getInstance("RSA", p);
        rsaGen.initialize(2048);
        KeyPair rsa = rsaGen.generateKeyPair();
        byte[] sig = sign("SHA256withRSA", p, rsa.getPrivate(), data);
        check(verify("SHA256withRSA", "SunRsaSign", soft(rsa.getPublic(), "RSA"), data, sig),
              "SHA256withRSA verifies in SunRsaSign");
        check(verify("SHA256withRSA", p.getName(), rsa.getPublic(), data, sig),
              "SHA256withRSA verifies in the module");
        sig[7] ^= 1;
        check(!verify("SHA256withRSA", p.getName(), rsa.getPublic(), data, sig),
              "a damaged RSA signature fails");
        pass("KeyPairGenerator RSA 2048, Signature SHA256withRSA");

        KeyPairGenerator ecGen = KeyPairGenerator.getInstance("EC", p);
        ecGen.initialize(new ECGenParameterSpec("secp256r1"));
        KeyPair ec = ecGen.generateKeyPair();
        sig = sign("SHA256withECDSA", p, ec.getPrivate(), data);
        check(verify("SHA256withECDSA", "SunEC", soft(ec.getPublic(), "EC"), data, sig),
              "SHA256withECDSA verifies in SunEC");
        pass("KeyPairGenerator EC P-256, Signature SHA256withECDSA");

        // A PrivateKeyEntry with its certificate chain: the key is imported (C_CreateObject of
        // a CKO_PRIVATE_KEY with its components), the certificate stored with the same CKA_ID.
        KeyStore p12 = KeyStore.getInstance("PKCS12");
        try (java.io.FileInputStream in = new java.io.FileInputStream(args[1])) {
            p12.load(in, "p12".toCharArray());
        }
        PrivateKey softKey = (PrivateKey) p12.getKey("entry", "p12".toCharArray());
        Certificate[] chain = p12.getCertificateChain("entry");
        ks.setKeyEntry("imported", softKey, null, chain);
        KeyStore.PrivateKeyEntry entry = (KeyStore.PrivateKeyEntry) ks.getEntry("imported", null);
        check(entry != null && Arrays.equals(entry.getCertificate().getEncoded(),
                                             chain[0].getEncoded()), "the entry's certificate");
        sig = sign("SHA256withRSA", p, entry.getPrivateKey(), data);
        check(verify("SHA256withRSA", "SunRsaSign", chain[0].getPublicKey(), data, sig),
              "the imported key signs");
        pass("KeyStore PrivateKeyEntry with its certificate chain");

        Cipher enc = Cipher.getInstance("RSA/ECB/PKCS1Padding", "SunJCE");
        enc.init(Cipher.ENCRYPT_MODE, soft(rsa.getPublic(), "RSA"));
        byte[] secret = random(32);
        Cipher dec = Cipher.getInstance("RSA/ECB/PKCS1Padding", p);
        dec.init(Cipher.DECRYPT_MODE, rsa.getPrivate());
        check(Arrays.equals(dec.doFinal(enc.doFinal(secret)), secret), "PKCS#1 decrypt");
        pass("Cipher RSA/ECB/PKCS1Padding decrypt");

        if (all) {
            // RSASSA-PSS: JDK 17's SunPKCS11 takes PSS parameters only for a hash the token
            // lists as a digest mechanism (here CKM_SHA256, run in the module); before the
            // module had digests, setParameter refused SHA-256.
            check(p.getService("MessageDigest", "SHA-256") != null,
                  "SunPKCS11 offers the module's CKM_SHA256");
            java.security.MessageDigest md = java.security.MessageDigest.getInstance("SHA-256", p);
            check(Arrays.equals(md.digest(data),
                                java.security.MessageDigest.getInstance("SHA-256", "SUN")
                                    .digest(data)), "SHA-256 in the module equals SUN's");
            PSSParameterSpec pss = new PSSParameterSpec("SHA-256", "MGF1",
                                                        MGF1ParameterSpec.SHA256, 32, 1);
            Signature ps = Signature.getInstance("RSASSA-PSS", p);
            ps.initSign(rsa.getPrivate());
            ps.setParameter(pss);
            ps.update(data, 0, 1000);
            ps.update(data, 1000, data.length - 1000);
            byte[] psig = ps.sign();
            Signature pv = Signature.getInstance("RSASSA-PSS", "SunRsaSign");
            pv.setParameter(pss);
            pv.initVerify(soft(rsa.getPublic(), "RSA"));
            pv.update(data);
            check(pv.verify(psig), "RSASSA-PSS verifies in SunRsaSign");
            Signature pm = Signature.getInstance("RSASSA-PSS", p);
            pm.initVerify(rsa.getPublic());
            pm.setParameter(pss);
            pm.update(data);
            check(pm.verify(psig), "RSASSA-PSS verifies in the module");
            pass("Signature RSASSA-PSS (SHA-256, MGF1 SHA-256, salt 32)");
            // Not OAEP: JDK 17's SunPKCS11 registers RSA/ECB/PKCS1Padding and RSA/ECB/NoPadding
            // only (P11RSACipher), whatever the token offers. Checked, so that a JDK that adds
            // it makes this test say so.
            check(p.getService("Cipher", "RSA/ECB/OAEPWithSHA-256AndMGF1Padding") == null
                  && p.getService("Cipher", "RSA/ECB/OAEPPadding") == null,
                  "SunPKCS11 has no OAEP cipher");
            try {
                Cipher.getInstance("RSA/ECB/OAEPWithSHA-256AndMGF1Padding", p);
                check(false, "SunPKCS11 has no OAEP cipher");
            } catch (javax.crypto.NoSuchPaddingException expected) {
                // "Unsupported padding OAEPWithSHA-256AndMGF1Padding": its RSA cipher knows
                // PKCS1Padding and NoPadding only.
            }
            byte[] raw = random(32);
            SecretKey imported = (SecretKey) javax.crypto.SecretKeyFactory
                .getInstance("AES", p).translateKey(new SecretKeySpec(raw, "AES"));
            byte[] iv = random(12);
            byte[] aad = random(20);
            Cipher g = Cipher.getInstance("AES/GCM/NoPadding", p);
            g.init(Cipher.ENCRYPT_MODE, imported, new GCMParameterSpec(128, iv));
            g.updateAAD(aad);
            byte[] mine = g.doFinal(data);
            Cipher ref = Cipher.getInstance("AES/GCM/NoPadding", "SunJCE");
            ref.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(raw, "AES"),
                     new GCMParameterSpec(128, iv));
            ref.updateAAD(aad);
            check(Arrays.equals(mine, ref.doFinal(data)), "AES-GCM equals SunJCE");
            g.init(Cipher.DECRYPT_MODE, imported, new GCMParameterSpec(128, iv));
            g.updateAAD(aad);
            check(Arrays.equals(g.doFinal(mine), data), "AES-GCM decrypts");
            pass("Cipher AES/GCM/NoPadding");
        }
        System.out.println("ALL PASSED");
    }
}
